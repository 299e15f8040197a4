#!/usr/bin/env bash
# The GPU table, ours beside the TurboQuant fork's llama-bench, in one device call: both
# programs on one synthetic Llama-3.1-8B-shaped Q4_K_M file, same GPU, same call, the ratios
# printed (docs/PERFORMANCE.md's GPU rows come from here; rerun it for every change to the store,
# the engine or the kernels).
#
# usage, on the GPU machine from the repo root (device tool: carry .carry):
#   bash scripts/gpu-bench.sh prepare          # synthesize the model, make sure the fork is built
#   bash scripts/gpu-bench.sh [TYPES] [DEPTH]  # prepare, then measure
# TYPES: cache types for K and V, comma-separated (default f16,turbo4,turbo3); `T/plain` runs ours
# with --no-kv-centering (the fork has no such mode: its column stays empty). DEPTH: the depth of
# the third column (default 32768).
#
# Inputs: .carry/dh-server-cuda.gz (scripts/build-cuda.sh) or DH_BIN; the fork's llama-bench at
# FORK_BENCH (default .carry/fork/build/bin/llama-bench). Where it is missing and FORK_BUILD names
# a command, that command is run first to build it. The fork's code and any recipe that builds it
# stay out of this repository (the workplace's rule for fetched code); ANCHORS.md has the cmake
# lines. Without a fork the table has our columns only.
# Environment: REPS (default 3) repetitions at depth 0, WORK (default /tmp/gpu-bench) for the model
# and the raw results (jsonl, one file per program).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/gpu-bench}
REPS=${REPS:-3}
FORK_BENCH=${FORK_BENCH:-$PWD/.carry/fork/build/bin/llama-bench}
MODEL=$WORK/8b.gguf
mkdir -p "$WORK"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}

bin=${DH_BIN:-$WORK/dh-server}
if [ ! -x "$bin" ]; then
  gunzip -c .carry/dh-server-cuda.gz > "$bin.tmp" && chmod +x "$bin.tmp" && mv "$bin.tmp" "$bin"
fi

prepare() {
  if [ ! -x "$FORK_BENCH" ] && [ -n "${FORK_BUILD:-}" ]; then
    echo "gpu-bench: building the fork ($FORK_BUILD)" >&2
    bash -c "$FORK_BUILD" > "$WORK/fork-build.log" 2>&1 || {
      tail -20 "$WORK/fork-build.log" >&2
      echo "gpu-bench: the fork's build failed; its column stays empty" >&2
    }
  fi
  if [ ! -s "$MODEL" ]; then
    echo "gpu-bench: writing $MODEL" >&2
    "$bin" synth -o "$MODEL.tmp" --shape llama-8b --type q4_k_m >&2
    mv "$MODEL.tmp" "$MODEL"
  fi
}

prepare
[ "${1:-}" = prepare ] && exit 0
TYPES=${1:-f16,turbo4,turbo3}
DEPTH=${2:-32768}
ours=$WORK/ours.jsonl
fork=$WORK/fork.jsonl
: > "$ours"
: > "$fork"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >&2 || true
for spec in ${TYPES//,/ }; do
  t=${spec%/plain}
  extra=()
  [ "$spec" != "$t" ] && extra=(--no-kv-centering)
  for args in "-p 512 -n 128 -r $REPS" "-p 0 -n 64 -d $DEPTH -r 1"; do
    # shellcheck disable=SC2086 # args are word lists on purpose
    "$bin" bench -m "$MODEL" -ngl 99 --cache-type-k "$t" --cache-type-v "$t" $args \
      "${extra[@]}" -o jsonl | sed "s|^{|{\"spec\":\"$spec\",|" >> "$ours"
    if [ "$spec" = "$t" ] && [ -x "$FORK_BENCH" ]; then
      # shellcheck disable=SC2086
      "$FORK_BENCH" -m "$MODEL" -ngl 99 -fa 1 -ctk "$t" -ctv "$t" $args -o jsonl 2>/dev/null |
        sed "s|^{|{\"spec\":\"$spec\",|" >> "$fork" || echo "gpu-bench: the fork failed on $t" >&2
    fi
  done
done

python3 scripts/gpu_bench_table.py "$ours" "$fork" "$DEPTH"

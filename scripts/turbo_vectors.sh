#!/usr/bin/env bash
# Regenerates tests/data/turbo_fork_vectors.json from the TurboQuant fork's quantizers.
# Usage: scripts/turbo_vectors.sh /path/to/llama-cpp-turboquant (built with cmake into build/)
set -euo pipefail
fork="${1:?path to the built llama-cpp-turboquant checkout}"
here="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
cc -O2 -o "$tmp/turbo_vectors" "$here/scripts/turbo_vectors.c" \
    -L"$fork/build/bin" -lggml-base -Wl,-rpath,"$fork/build/bin" -lm
"$tmp/turbo_vectors" > "$here/tests/data/turbo_fork_vectors.json"
echo "wrote tests/data/turbo_fork_vectors.json" >&2

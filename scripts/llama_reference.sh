#!/usr/bin/env bash
# Regenerates tests/data/llama_cpp_reference.json from a llama.cpp build beside the project
# (TheTom/llama-cpp-turboquant, branch feature/turboquant-kv-cache; see docs/PERFORMANCE.md for the build).
# usage: LL=/path/to/llama-cpp-turboquant bash scripts/llama_reference.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LL=${LL:-../llama-fork}
SHARED=${DH_SHARED:-../shared}
export LD_LIBRARY_PATH=$LL/build/bin
g++ -O2 -std=c++17 scripts/llama_greedy.cpp -I"$LL/include" -I"$LL/ggml/include" -L"$LL/build/bin" \
  -lllama -lggml -lggml-base -o /tmp/llama_greedy
out=$(mktemp -d)
for m in SmolLM2-135M-Instruct.Q4_1.gguf gemma-3-270m-q4_k_m.gguf; do
  "$LL/build/bin/llama-perplexity" -m "models/$m" -f "$SHARED/data/wikitext-2-raw-test.txt" -c 512 --chunks 40 \
    -t 2 -fa on -ctk f16 -ctv f16 > "$out/$m.ppl" 2>&1
  while IFS= read -r p; do
    /tmp/llama_greedy "models/$m" 64 "$p" 2>/dev/null >> "$out/$m.greedy"
  done < tests/data/prompts.txt
done
python3 - "$out" <<'PY'
import json, re, sys, os
out = sys.argv[1]
prompts = [l.rstrip("\n") for l in open("tests/data/prompts.txt")]
ref = {"generated_by": "scripts/llama_reference.sh", "llama_cpp": "TheTom/llama-cpp-turboquant 69d8e4be4",
       "perplexity_command": "llama-perplexity -m M -f wikitext-2-raw-test.txt -c 512 --chunks 40 -t 2 -fa on -ctk f16 -ctv f16",
       "greedy_command": "scripts/llama_greedy.cpp: raw prompt with the model's BOS rule, greedy sampler, 64 tokens",
       "models": {}}
for m in ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"]:
    ppl = float(re.search(r"Final estimate: PPL = ([0-9.]+)", open(f"{out}/{m}.ppl").read()).group(1))
    lines = open(f"{out}/{m}.greedy").read().splitlines()
    greedy = []
    for i, p in enumerate(prompts):
        pid, gid, mg = lines[3 * i], lines[3 * i + 1], lines[3 * i + 2]
        greedy.append({"prompt": p, "prompt_ids": [int(x) for x in pid.split(",") if x],
                       "ids": [int(x) for x in gid.split(",") if x],
                       "margins": [float(x) for x in mg.split(",") if x]})
    ref["models"][m] = {"perplexity_f16": ppl, "greedy": greedy}
json.dump(ref, open("tests/data/llama_cpp_reference.json", "w"), indent=1)
print(json.dumps({m: v["perplexity_f16"] for m, v in ref["models"].items()}))
PY

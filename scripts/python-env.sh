#!/usr/bin/env bash
# The Python clients the server tests drive, from PyPI, in .venv (idempotent; prints the python path).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import openai, jsonschema, run_agent" 2>/dev/null; then
    python3 -m venv .venv >&2
    .venv/bin/pip install -q --disable-pip-version-check "hermes-agent==0.19.0" "openai" "jsonschema" >&2
fi
echo "$PWD/.venv/bin/python"

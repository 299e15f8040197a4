#!/usr/bin/env bash
# Every test: fetch the models (PyPI), check formatting and lints, run unit + integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-models.sh >/dev/null
bash scripts/python-env.sh >/dev/null
cargo fmt --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release

#!/usr/bin/env bash
# Builds dh-server with `--features cuda` on this (GPU-less) machine for the GPU machines, into
# target/cuda (a target dir of its own: the CUDA RUSTFLAGS would otherwise rebuild the CPU build),
# and leaves a gzipped copy in .carry/dh-server-cuda.gz for the device tool to carry.
# usage: bash scripts/build-cuda.sh         (docs/CUDA.md)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${DH_SHARED:-../shared}
eval "$(bash "$SHARED/scripts/cuda-toolchain.sh")"
# keep the CPU build's target-cpu=native out: the GPU host's CPU may differ from this one
export RUSTFLAGS="$RUSTFLAGS -C target-cpu=x86-64-v3"
CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda --bin dh-server
mkdir -p .carry
gzip -c target/cuda/release/dh-server > .carry/dh-server-cuda.gz
ls -la .carry/dh-server-cuda.gz

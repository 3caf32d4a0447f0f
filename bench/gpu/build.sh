#!/usr/bin/env bash
# Builds the GPU verification program (`appliance/train/examples/gpu_check.rs`) with the `cuda` feature
# on this machine (no GPU needed: scripts/setup-cuda.sh --link provides the toolkit and link
# libraries) and packs what `bench/gpu/run.sh` needs on the GPU machine into DEST:
# gpu_check.xz (stripped, ~10 MB), run.sh, torch_step.py with torch_unet.py, report.py.
#
#   bench/gpu/build.sh [DEST]       (default: out/gpu-carry; the cuda build goes to target-cuda/)
# Then, on the GPU machine: OUT=<results folder> bash DEST/run.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
DEST="${1:-$ROOT/out/gpu-carry}"
eval "$(bash scripts/setup-cuda.sh --link)"
cargo build --release -p cosilo-train --features cuda --example gpu_check --target-dir target-cuda
mkdir -p "$DEST"
strip -o "$DEST/gpu_check" target-cuda/release/examples/gpu_check
xz -9 -T2 -f "$DEST/gpu_check"
cp bench/gpu/run.sh bench/gpu/profile.sh bench/gpu/torch_step.py bench/torch_unet.py bench/gpu/torch_ops.py bench/gpu/report.py "$DEST/"
git rev-parse HEAD >"$DEST/commit.txt"
du -sh "$DEST"

#!/usr/bin/env bash
# Training speed: one step of the candle U-Net (with Cosilo's CPU ops) against the identical
# PyTorch step, side by side in the same run, at the issue's size (base 16, depth 3, batch 8 ×
# 128²) and the demo's (base 8, depth 3, batch 8 × 96²), 2 threads each. Target: candle within
# 1.25× of PyTorch. Also times the old step (candle's own ops) once per size, for before/after.
# Writes bench/results/train_vs_pytorch.md (details in bench/train_vs_pytorch.py).
#
# PyTorch: PyPI has no CPU-only torch wheel for x86-64 Linux; `torch==2.15.0` there is the CUDA 13
# build, and it does not import without its nvidia-* dependency wheels (with --no-deps, `import
# torch` fails looking for libcublasLt). So this script installs torch 2.15.0 with all of its
# dependencies (~3.5 GB of wheels, 5.4 GB installed; it runs on the CPU, no GPU needed) into a
# virtual environment cached outside the repository, once: $COSILO_TORCH_VENV, by default
# ~/.cache/cosilo-bench/torch-2.15.0. Only the registry pip is configured for is used.
#
# Usage: bench/train_vs_pytorch.sh                 3 rounds per size
#        ROUNDS=5 STEPS=8 THREADS=2 bench/train_vs_pytorch.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${COSILO_TORCH_VENV:-$HOME/.cache/cosilo-bench/torch-2.15.0}"
ROUNDS="${ROUNDS:-3}"
STEPS="${STEPS:-6}"
THREADS="${THREADS:-2}"
PY="$VENV/bin/python"

if ! "$PY" -c 'import sys, torch; sys.exit(not torch.__version__.startswith("2.15.0"))' 2>/dev/null; then
    echo "==> installing torch 2.15.0 into $VENV (once; ~3.5 GB download)" >&2
    python3 -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet torch==2.15.0 numpy
fi

echo "==> building the candle step timer (release)" >&2
cargo build --quiet --release -p cosilo-appliance --example train_step

"$PY" bench/train_vs_pytorch.py \
    --candle-bin target/release/examples/train_step \
    --rounds "$ROUNDS" --steps "$STEPS" --threads "$THREADS" \
    --out bench/results/train_vs_pytorch.md

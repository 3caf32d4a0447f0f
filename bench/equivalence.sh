#!/usr/bin/env bash
# Behaviour preserved across a refactor: the same training and the same FedAvg federation run with
# two builds of `cosilo`, and the SHA-256 of the resulting models compared.
#
#   bench/equivalence.sh OLD_COSILO NEW_COSILO [OUT]
#
# OLD_COSILO `-` runs only the new build (compare with the hashes recorded in
# bench/results/refactor_equivalence.md).
#
# 1. Single-site training: h1's 40 cases, the default training configuration and seed, 4 epochs
#    (`cosilo train --epochs 4`), exported with `cosilo export`: model.onnx must be identical.
# 2. FedAvg: `cosilo demo --strategy fedavg --rounds 3 --steps-per-round 5 --personalise-steps 0`
#    (three appliance processes over the embedded broker); each site's final shared model,
#    exported: all three sites identical, and identical between the builds.
set -euo pipefail
OLD=$1; NEW=$2; OUT=${3:-out/equivalence}
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(cd "$(dirname "$0")/.." && pwd)/.ort/libonnxruntime.so.1.31.1}"
mkdir -p "$OUT"
"$NEW" data fetch >/dev/null
[ -d "$OUT/cohort" ] || "$NEW" data cohort --out "$OUT/cohort" >/dev/null
train_hash() { # BIN DIR
  rm -rf "$2"; mkdir -p "$2"
  "$1" import --store "$2/h1" --manifest "$OUT/cohort/manifest.json" --hospital h1 >/dev/null 2>&1
  "$1" train --store "$2/h1" --run h1-local --epochs 4 >"$2/train.log" 2>&1
  "$1" export --store "$2/h1" --run h1-local --out "$2/bundle" >/dev/null
  sha256sum "$2/bundle/model.onnx" | cut -d' ' -f1
}
fedavg_hashes() { # BIN DIR
  rm -rf "$2"; mkdir -p "$2"
  "$1" demo --out "$2/demo" --results "$2/results" --rounds 3 --steps-per-round 5 \
    --personalise-steps 0 --strategy fedavg >"$2/demo.log" 2>&1
  for h in h1 h2 h3; do
    "$1" export --store "$2/demo/$h-store" --run fed-demo-fedavg --out "$2/bundle-$h" >/dev/null
    echo "$h $(sha256sum "$2/bundle-$h/model.onnx" | cut -d' ' -f1)"
  done
}
[ "$OLD" = - ] || echo "training, old: $(train_hash "$OLD" "$OUT/train-old")"
echo "training, new: $(train_hash "$NEW" "$OUT/train-new")"
[ "$OLD" = - ] || { echo "fedavg, old:"; fedavg_hashes "$OLD" "$OUT/fedavg-old"; }
echo "fedavg, new:"; fedavg_hashes "$NEW" "$OUT/fedavg-new"

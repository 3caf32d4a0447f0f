#!/usr/bin/env bash
# The main job, from a fresh clone: `scripts/demo.sh`.
#
# Sets up what it needs (the ONNX Runtime library, the real anatomy), builds a multi-hospital cohort,
# trains a model on the largest hospital's cases with candle, exports it to ONNX and segments that
# hospital's held-out volumes with the SDK, printing Dice. Anatomy is real; lesions and scanner
# effects are simulated.
#
# Environment: DEMO_OUT (default ./out/demo), DEMO_EPOCHS / DEMO_STEPS (training length).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
OUT="${DEMO_OUT:-$ROOT/out/demo}"
T0=$(date +%s)

ensure_apt
ensure_ort

say "build (release)"
cargo build --release --quiet -p cosilo-appliance
COSILO="$ROOT/target/release/cosilo"

say "fetch real anatomy"
"$COSILO" data fetch

say "build the cohort (3 hospitals: 40 / 15 / 5 training patients, 4 held out each)"
"$COSILO" data cohort --out "$OUT/cohort" --seed 7 --sizes 40,15,5 --test 4

say "import hospital h1 into its appliance's store"
rm -rf "$OUT/h1-store"
"$COSILO" import --store "$OUT/h1-store" --manifest "$OUT/cohort/manifest.json" --hospital h1

say "train on h1 (candle, CPU)"
"$COSILO" train --store "$OUT/h1-store" --run h1-local \
  ${DEMO_EPOCHS:+--epochs "$DEMO_EPOCHS"} ${DEMO_STEPS:+--steps-per-epoch "$DEMO_STEPS"} \
  --report "$OUT/reports/h1-local"

say "export to ONNX"
"$COSILO" export --store "$OUT/h1-store" --run h1-local --out "$OUT/bundles/h1-local"

say "segment h1's held-out volumes with the SDK (ONNX Runtime)"
for img in "$OUT"/cohort/h1/h1-test-*_image.nii.gz; do
  case_id="$(basename "$img" _image.nii.gz)"
  "$COSILO" segment --bundle "$OUT/bundles/h1-local" --input "$img" \
    --output "$OUT/segmentations/${case_id}_seg.nii.gz" --truth "${img%_image.nii.gz}_label.nii.gz"
done

say "done in $(( $(date +%s) - T0 )) s: report in $OUT/reports/h1-local, bundle in $OUT/bundles/h1-local"

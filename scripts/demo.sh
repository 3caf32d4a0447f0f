#!/usr/bin/env bash
# The main job, from a fresh clone: `scripts/demo.sh`.
#
# Sets up what it needs (the ONNX Runtime library, the real anatomy), builds a 3-hospital cohort
# (40 / 15 / 5 training patients, 4 held out each), and runs `cosilo demo`: three appliances, each
# its own process with only its own hospital's cases in its own store, federated over MQTT
# (embedded broker, signed messages, gossip-avg), against each hospital training alone; after
# the rounds each federated site fine-tunes the shared model on its own cases (personalisation)
# while each local-only site trains as many more steps, so both arms train the same number of
# steps. It prints held-out Dice per hospital and class (initial, local-only, federated shared,
# federated + personalised) and writes $OUT/results/federation-demo.{md,json,svg}. Then it exports
# h1's personalised federated model to ONNX and segments h1's held-out volumes with the SDK.
# Anatomy is real; lesions and scanner effects are simulated. About 10 minutes on 2 cores.
#
# It changes no tracked file: everything goes under $OUT (./out/demo, ignored by git). With
# `--publish` it then copies the results into docs/results/ (tracked: the numbers the README
# quotes), to be reviewed and committed by hand.
#
# Usage: scripts/demo.sh [--publish]
# Environment: DEMO_OUT (default ./out/demo), DEMO_ROUNDS / DEMO_STEPS (rounds, steps per round),
# DEMO_PERSONALISE (personalisation steps, default 2 x steps per round; 0 = off),
# DEMO_STRATEGY (gossip-avg, braintorrent, fedavg, ciil, iil).
set -euo pipefail
PUBLISH=0
for arg in "$@"; do
  case "$arg" in
    --publish) PUBLISH=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (usage: scripts/demo.sh [--publish])" >&2; exit 64 ;;
  esac
done
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
OUT="${DEMO_OUT:-$ROOT/out/demo}"
RESULTS="$OUT/results"
T0=$(date +%s)

ensure_apt
ensure_ort

say "build (release)"
cargo build --release --quiet -p cosilo-appliance
COSILO="$ROOT/target/release/cosilo"

say "federation demo: 3 hospitals, gossip-avg vs local-only"
"$COSILO" demo --out "$OUT" --results "$RESULTS" \
  ${DEMO_ROUNDS:+--rounds "$DEMO_ROUNDS"} ${DEMO_STEPS:+--steps-per-round "$DEMO_STEPS"} \
  ${DEMO_PERSONALISE:+--personalise-steps "$DEMO_PERSONALISE"} \
  ${DEMO_STRATEGY:+--strategy "$DEMO_STRATEGY"}
RUN="fed-demo-${DEMO_STRATEGY:-gossip-avg}"
# The personalised model when there is one (DEMO_PERSONALISE=0: the shared model).
[ "${DEMO_PERSONALISE:-}" = 0 ] || RUN="$RUN-personalised"

say "export h1's federated model to ONNX"
rm -rf "$OUT/bundles/h1-federated"
"$COSILO" export --store "$OUT/h1-store" --run "$RUN" --out "$OUT/bundles/h1-federated"

say "segment h1's held-out volumes with the SDK (ONNX Runtime)"
for img in "$OUT"/cohort/h1/h1-test-*_image.nii.gz; do
  case_id="$(basename "$img" _image.nii.gz)"
  "$COSILO" segment --bundle "$OUT/bundles/h1-federated" --input "$img" \
    --output "$OUT/segmentations/${case_id}_seg.nii.gz" --truth "${img%_image.nii.gz}_label.nii.gz"
done

if [ "$PUBLISH" = 1 ]; then
  say "publish: copy the results into docs/results/"
  mkdir -p "$ROOT/docs/results"
  cp "$RESULTS"/federation-demo.* "$ROOT/docs/results/"
  SHOWN="docs/results/federation-demo.md"
else
  SHOWN="$RESULTS/federation-demo.md"
fi

say "done in $(( $(date +%s) - T0 )) s: results in $SHOWN, bundle in $OUT/bundles/h1-federated"

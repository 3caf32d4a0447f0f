#!/usr/bin/env bash
# FedSM routed bundle vs the single-model SDK path: time per volume, side by side in one process
# (appliance/train/examples/routed_bench.rs: the same volume, alternating single / selector only / routed,
# ROUNDS rounds, medians). Target (issue 11): routed <= single + 10 %.
#
# Usage: bench/routed_inference.sh            writes bench/results/fedsm_routing.md
#        SIZE=256 SLICES=24 ROUNDS=5 THREADS=2 bench/routed_inference.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SIZE="${SIZE:-256}"
SLICES="${SLICES:-24}"
ROUNDS="${ROUNDS:-5}"
THREADS="${THREADS:-2}"
RESULT="$ROOT/bench/results/fedsm_routing.md"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$ROOT/.ort/libonnxruntime.so.1.31.1}"

echo "==> building (release)" >&2
cargo build --quiet --release -p cosilo-train --example routed_bench
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
OUT="$(./target/release/examples/routed_bench "$SIZE" "$SLICES" "$ROUNDS" "$THREADS")"
echo "$OUT" >&2
LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"
CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
COMMIT="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- sdk appliance tests || echo '+uncommitted')"
python3 - "$RESULT" "$CPU" "$(nproc)" "$(date -u +%Y-%m-%dT%H:%MZ)" "$COMMIT" "$LOAD_BEFORE" "$LOAD_AFTER" \
    "SIZE=$SIZE SLICES=$SLICES ROUNDS=$ROUNDS THREADS=$THREADS bench/routed_inference.sh" <<PY
import json, sys
out_path, cpu, cores, date, commit, lb, la, cmd = sys.argv[1:]
lines = [json.loads(l) for l in """$OUT""".splitlines() if l.strip()]
s = [l for l in lines if l.get("summary")][0]
rows = [l for l in lines if not l.get("summary")]
with open(out_path, "w") as f:
    f.write("# FedSM routed bundle vs single model: time per volume\n\n")
    f.write(f"Command: \`{cmd}\`  \nCommit: {commit}  \nDate: {date}  \n")
    f.write(f"Machine: {cpu}, {cores} cores (shared; load average {lb} before, {la} after)\n\n")
    f.write(f"Volume {s['size']}×{s['size']}×{s['slices']}, ONNX Runtime 1.31.1 with {s['threads']} intra-op threads, "
            "U-Net base 16 depth 3 (5 classes), selector base 8 depth 3 (3 sites), one slice per call.\n\n")
    f.write("| path | median s / volume |\n|---|---|\n")
    f.write(f"| single model (\`Segmenter::segment\`) | {s['single_median_s']:.3f} |\n")
    f.write(f"| selector only (\`RoutedSegmenter::route\`) | {s['selector_median_s']:.3f} |\n")
    f.write(f"| routed (\`RoutedSegmenter::segment\`: selector + chosen model) | {s['routed_median_s']:.3f} |\n\n")
    f.write(f"Routed / single: **{s['routed_over_single']:.3f}** (target ≤ 1.10).\n\n")
    f.write("Every timed round (seconds):\n\n| round | single | selector only | routed |\n|---|---|---|---|\n")
    for r in rows:
        f.write(f"| {r['round']} | {r['single_s']:.3f} | {r['selector_only_s']:.3f} | {r['routed_s']:.3f} |\n")
print(open(out_path).read())
PY

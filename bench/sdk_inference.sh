#!/usr/bin/env bash
# SDK inference speed: the Cosilo SDK (Rust, ort → ONNX Runtime 1.31.1) against onnxruntime's own
# Python API on the same ONNX file with the same settings (2 intra-op threads, 1 inter-op thread,
# all graph optimisations), batch 1 and batch 16 of 256² slices. Target: the SDK within 10 %.
#
# The model is the default training configuration (base 16, depth 3, 5 classes), seeded and
# untrained: speed does not depend on the weights. The runs alternate SDK / Python for ROUNDS rounds
# (default 3) so both sides meet the same machine load; each run reports the median and the minimum
# of its timed calls. Other jobs on the machine only ever add time, so the table compares each
# side's quietest run (lowest median) and best single call; every run is listed below it.
#
# Usage: bench/sdk_inference.sh                writes bench/results/sdk_inference.md
#        ROUNDS=5 THREADS=2 SIZE=256 bench/sdk_inference.sh
#        bench/sdk_inference.sh --report-only  re-tabulates the last runs
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${COSILO_PYTHON:-python3}"
ROUNDS="${ROUNDS:-3}"
THREADS="${THREADS:-2}"
SIZE="${SIZE:-256}"
BATCHES="${BATCHES:-1,16}"
WORK="$ROOT/out/bench/sdk_inference"
RESULT="$ROOT/bench/results/sdk_inference.md"

scripts/setup-ort.sh
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$ROOT/.ort/libonnxruntime.so.1.31.1}"
if ! "$PY" -c 'import numpy, onnxruntime, sys; sys.exit(onnxruntime.__version__ != "1.31.1")' 2>/dev/null; then
    echo "==> $PY -m pip install onnxruntime==1.31.1 numpy" >&2
    "$PY" -m pip install --quiet onnxruntime==1.31.1 numpy
fi

echo "==> building (release)" >&2
cargo build --quiet --release -p cosilo-sdk --example infer_bench
cargo build --quiet --release -p cosilo-tests --example export_bundle

if [[ "${1:-}" != "--report-only" ]]; then
    rm -rf "$WORK"
    mkdir -p "$WORK"
    ./target/release/examples/export_bundle "$WORK/bundle" 16 3 1 >&2
    : > "$WORK/runs.jsonl"
    for r in $(seq 1 "$ROUNDS"); do
        echo "==> round $r/$ROUNDS: SDK (load $(cut -d' ' -f1 /proc/loadavg))" >&2
        ./target/release/examples/infer_bench "$WORK/bundle" "$THREADS" "$SIZE" "$BATCHES" \
            | sed "s/}\$/, \"round\": $r, \"load\": $(cut -d' ' -f1 /proc/loadavg)}/" | tee -a "$WORK/runs.jsonl" >&2
        echo "==> round $r/$ROUNDS: Python onnxruntime (load $(cut -d' ' -f1 /proc/loadavg))" >&2
        "$PY" bench/sdk_inference.py "$WORK/bundle" "$THREADS" "$SIZE" "$BATCHES" \
            | sed "s/}\$/, \"round\": $r, \"load\": $(cut -d' ' -f1 /proc/loadavg)}/" | tee -a "$WORK/runs.jsonl" >&2
    done
fi

CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
"$PY" - "$WORK/runs.jsonl" "$RESULT" "$CPU" "$(nproc)" "$(date -u +%Y-%m-%d)" <<'PY'
import json, sys
runs_path, out_path, cpu, cores, date = sys.argv[1:]
runs = [json.loads(l) for l in open(runs_path) if l.strip()]

def pick(runtime, what, batch):
    return [r for r in runs if r["runtime"] == runtime and r["what"] == what and r["batch"] == batch]

size, threads = runs[0]["size"], runs[0]["threads"]
rounds = max(r.get("round", 1) for r in runs)
batches = sorted({r["batch"] for r in runs if r["what"] == "run"})
lines = [
    "# SDK inference: Cosilo SDK (Rust, ort) vs onnxruntime's Python API",
    "",
    f"Produced by `bench/sdk_inference.sh` on {date}. Same `model.onnx` (default U-Net: base 16, depth 3,"
    " 5 classes, 0.48 M parameters, 123 nodes, opset 17), ONNX Runtime 1.31.1 on both sides, CPU execution"
    f" provider, {threads} intra-op threads, 1 inter-op thread, all graph optimisations. Input:"
    f" [batch, 1, {size}, {size}] float32, the same deterministic pattern on both sides.",
    "",
    f"Machine: {cpu}, {cores} cores, shared with other jobs (compilers) while this ran: the runs alternate"
    f" SDK / Python for {rounds} rounds, and since other load only adds time, each side is represented by"
    " its quietest run (lowest median call time) and its fastest single call. All runs are listed below.",
    "",
    "Ratio = SDK time / Python time (1.00 = equal, above 1 = the SDK is slower). Target: within 10 %.",
    "",
    f"| batch | runtime | ms per call (median, quietest run) | ms per {size}² slice | slices/s | fastest call, ms per slice | ratio (median) | ratio (fastest) |",
    "|---:|---|---:|---:|---:|---:|---:|---:|",
]
checks = []
for b in batches:
    row = {}
    for rt in ("sdk", "python"):
        rs = pick(rt, "run", b)
        row[rt] = (min(r["median_ms"] for r in rs), min(r["min_ms"] for r in rs), {round(r["checksum"], 3) for r in rs})
    for rt, name in (("sdk", "Cosilo SDK (ort 2.0.0-rc.15)"), ("python", "onnxruntime Python API")):
        med, best, _ = row[rt]
        ratio = (f"{row['sdk'][0] / row['python'][0]:.2f}", f"{row['sdk'][1] / row['python'][1]:.2f}") if rt == "sdk" else ("", "")
        lines.append(f"| {b} | {name} | {med:.1f} | {med / b:.1f} | {1000 * b / med:.1f} | {best / b:.1f} | {ratio[0]} | {ratio[1]} |")
    checks.append((b, row["sdk"][2], row["python"][2]))
seg = pick("sdk", "segment", max(batches))
if seg:
    med = min(r["median_ms"] for r in seg)
    n = seg[0]["batch"]
    per_call = seg[0].get("segment_batch", n)
    lines += ["", f"End to end, `Segmenter::segment` on a {size}×{size}×{n} volume (intensity normalisation,"
              f" padding, {per_call} slice(s) per inference call (the SDK default), argmax, label mapping,"
              f" class volumes), quietest run: {med:.0f} ms, {med / n:.1f} ms per slice."]
lines += ["", "Output checksums (sum of all probabilities; equal means both sides computed the same):", ""]
for b, s_, p in checks:
    lines.append(f"- batch {b}: SDK {sorted(s_)}, Python {sorted(p)}" + (" (identical)" if s_ == p else " (DIFFERENT)"))
lines += ["", "Every run (median / fastest call in ms; load = 1-minute load average when the run started):", "",
          "| round | runtime | batch | median ms | fastest ms | calls | load |", "|---:|---|---:|---:|---:|---:|---:|"]
for r in runs:
    if r["what"] == "run":
        lines.append(f"| {r.get('round', '')} | {r['runtime']} | {r['batch']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['calls']} | {r.get('load', '')} |")
open(out_path, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "==> wrote $RESULT" >&2

#!/usr/bin/env bash
# Per-op time and memory, candle on CUDA against PyTorch on the same GPU (`gpu_check profile` and
# torch_ops.py), at batches PROFILE_BATCHES (default "8 32"). Same setup as run.sh (same folder,
# same library discovery); writes ops.jsonl and ops.md into $OUT.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BIN="$HERE/gpu_check"
if [ -f "$HERE/gpu_check.xz" ]; then
    BIN=/tmp/gpu_check
    [ -x "$BIN" ] || { xz -dc "$HERE/gpu_check.xz" >"$BIN" && chmod +x "$BIN"; }
fi
LIBS="$("$PY" -c 'import glob, os, nvidia, torch; d=[g for p in nvidia.__path__ for g in sorted(glob.glob(os.path.join(p, "*", "lib")))]; print(":".join(d + [os.path.join(os.path.dirname(torch.__file__), "lib")]))' 2>/dev/null)"
export LD_LIBRARY_PATH="${LIBS}${LIBS:+:}/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
: >"$OUT/ops.jsonl"
for b in ${PROFILE_BATCHES:-8 32}; do
    "$BIN" profile "$b" | tee -a "$OUT/ops.jsonl"
    "$PY" "$HERE/torch_ops.py" "$b" | tee -a "$OUT/ops.jsonl"
done
"$PY" - "$OUT/ops.jsonl" <<'PYEOF' | tee "$OUT/ops.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
c = {(r["op"], r["batch"]): r for r in rows if r["impl"] == "candle"}
t = {(r["op"], r["batch"]): r for r in rows if r["impl"] == "pytorch"}
print("| op | batch | candle fwd ms | PyTorch fwd ms | candle fwd+bwd ms | PyTorch fwd+bwd ms | ratio fwd+bwd | candle peak MiB above inputs | PyTorch peak MiB above inputs |")
print("|---|---|---|---|---|---|---|---|---|")
for k in c:
    a, p = c[k], t.get(k, {})
    f = lambda v: "-" if v is None else f"{v:.2f}"
    ratio = a["ms_forward_backward"] / p["ms_forward_backward"] if p else None
    print(f"| {k[0]} | {k[1]} | {f(a['ms_forward'])} | {f(p.get('ms_forward'))} | {f(a['ms_forward_backward'])} | "
          f"{f(p.get('ms_forward_backward'))} | {f(ratio)} | {f(a.get('peak_above_inputs_mib'))} | {f(p.get('peak_above_inputs_mib'))} |")
PYEOF

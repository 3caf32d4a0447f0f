#!/usr/bin/env bash
# The GPU verification and benchmark run, on a machine with an NVIDIA GPU, its driver, the CUDA 13
# libraries (cuBLAS, cuRAND, NVRTC) in python3's site-packages (as a PyTorch install brings them)
# and PyTorch. No Rust and no package registry needed there: it runs a prebuilt `gpu_check`
# (`bench/gpu/build.sh` makes it and packs what travels into one folder).
#
#   OUT=/some/dir bash run.sh          (in the folder that holds gpu_check or gpu_check.xz)
#
# Writes into $OUT: log.txt (everything), env.txt (GPU, driver, libraries), check.json (the
# parity and gradient checks), candle.jsonl and torch.jsonl (one line per timed configuration),
# smi_peaks.txt (nvidia-smi's memory peak per benchmark process) and summary.md.
# BATCHES (default "8 128 256"), SIZE (128), STEPS (10), TRAIN_STEPS (40) tune it.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BATCHES="${BATCHES:-8 128 256}"
SIZE="${SIZE:-128}"
STEPS="${STEPS:-10}"
TRAIN_STEPS="${TRAIN_STEPS:-40}"
exec > >(tee -a "$OUT/log.txt") 2>&1
t_start=$(date +%s)
stamp() { echo "[$(($(date +%s) - t_start)) s] $*"; }

BIN="$HERE/gpu_check"
if [ -f "$HERE/gpu_check.xz" ]; then
    BIN=/tmp/gpu_check
    xz -dc "$HERE/gpu_check.xz" >"$BIN" && chmod +x "$BIN"
fi

# The CUDA libraries the binary links (libcublas.so.13, libcublasLt.so.13, libcurand.so.10,
# libnvrtc.so.13, libcudart.so.13): every nvidia/*/lib folder of python3's site-packages, then
# torch's own lib folder; the driver's libcuda.so.1 comes from the system (ldconfig) or
# /usr/local/nvidia/lib64.
LIBS="$("$PY" - <<'EOF' 2>/dev/null
import glob, os, site, sys
dirs = []
roots = list(site.getsitepackages()) + [site.getusersitepackages()]
try:
    import nvidia
    roots = list(nvidia.__path__) + roots
except Exception:
    pass
for r in roots:
    base = r if os.path.basename(r) == "nvidia" else os.path.join(r, "nvidia")
    dirs += sorted(glob.glob(os.path.join(base, "*", "lib")))
try:
    import torch
    dirs.append(os.path.join(os.path.dirname(torch.__file__), "lib"))
except Exception:
    pass
seen = []
for d in dirs:
    if os.path.isdir(d) and d not in seen:
        seen.append(d)
print(":".join(seen))
EOF
)"
export LD_LIBRARY_PATH="${LIBS}${LIBS:+:}/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"

{
    echo "date: $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    nvidia-smi 2>&1 | head -15
    echo "python: $("$PY" --version 2>&1); torch: $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version())' 2>&1)"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    echo "ldd gpu_check:"
    ldd "$BIN" 2>&1
    nproc
} >"$OUT/env.txt"
cat "$OUT/env.txt"
if ldd "$BIN" | grep -q "not found"; then
    stamp "gpu_check is missing libraries (see env.txt)"
fi

stamp "gpu_check device"
"$BIN" device

stamp "gpu_check check"
"$BIN" check "$OUT/check.json" "$TRAIN_STEPS"
echo "check exit status: $?"

# nvidia-smi's memory.used, every 50 ms, while one benchmark process runs; its peak minus the
# idle reading is that process's footprint (CUDA context included).
poll() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"/tmp/smi-$1.txt" 2>/dev/null & echo $!; }
peak() { sort -n "/tmp/smi-$1.txt" 2>/dev/null | tail -1; }
idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1)
echo "idle ${idle:-?} MiB" >"$OUT/smi_peaks.txt"

: >"$OUT/candle.jsonl"
for b in $BATCHES; do
    stamp "candle step, batch $b x ${SIZE}^2"
    pid=$(poll "candle-$b")
    "$BIN" bench "$b" "$SIZE" "$STEPS" 20 | tee -a "$OUT/candle.jsonl"
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    echo "candle $b $(peak "candle-$b") MiB" >>"$OUT/smi_peaks.txt"
done

stamp "PyTorch step"
pid=$(poll torch)
PYTHONUNBUFFERED=1 "$PY" "$HERE/torch_step.py" --batches "$(echo $BATCHES | tr ' ' ,)" --size "$SIZE" \
    --steps "$STEPS" --budget 20 | tee "$OUT/torch.jsonl"
kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
echo "torch all $(peak torch) MiB" >>"$OUT/smi_peaks.txt"

stamp "summary"
"$PY" "$HERE/report.py" "$OUT" | tee "$OUT/summary.md"
stamp "done"

#!/usr/bin/env bash
# C-STORE receive throughput: dcmtk storescu (TCP_NODELAY=1) sends the real 108-instance CT series
# (`cosilo data dicom`) in one association to, in the same run, interleaved within each repetition:
#   storescp        dcmtk's storescp writing to disk (no sync)
#   orthanc         Orthanc (Debian's; SyncStorageArea true by default: one sync per stored file),
#                   started per repetition with a fresh storage folder and TCP_NODELAY=1
#   cosilo          what `cosilo bridge` runs: de-identification (pseudonym table: one fdatasync
#                   per series, instance lines synced every second) + durable spool (journal
#                   append + fdatasync) + assembler: one sync per instance
#   cosilo-spool    the durable spool alone (one journal append + fdatasync per instance)
#   cosilo-nofsync  the same SCP with a benchmark-only sink that skips fsync like storescp does
# Load average printed per repetition, fresh output directory per repetition.
# Usage: bench/store_bench.sh [CT_DIR] [REPS]
set -euo pipefail
cd "$(dirname "$0")/.."
CT_DIR=${1:-}
REPS=${2:-5}
WORK=$(mktemp -d)
trap 'kill ${RX_PID:-0} 2>/dev/null || true; wait 2>/dev/null; rm -rf "$WORK"' EXIT
if [ -z "$CT_DIR" ]; then
  ./target/release/cosilo data dicom --out "$WORK/data" >/dev/null
  CT_DIR="$WORK/data/ct-cranium"
fi
cargo build --release -q -p cosilo-bridge --example store_bench
FILES=("$CT_DIR"/*.dcm)
N=${#FILES[@]}
BYTES=$(cat "${FILES[@]}" | wc -c)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export TCP_NODELAY=1
# Our receiver runs until stdin closes; a FIFO held open here keeps it waiting.
mkfifo "$WORK/ctl"; exec 3<>"$WORK/ctl"

# Polls (against a 20 s deadline) until the receiver accepts connections.
wait_port() { for _ in $(seq 400); do (echo >/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && return; sleep 0.05; done; echo "receiver did not start" >&2; exit 1; }

send() { # $1 = called AE; prints seconds
  local t0 t1
  t0=$(date +%s.%N)
  storescu -aec "$1" 127.0.0.1 "$PORT" "${FILES[@]}"
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc -l
}

echo "| receiver | rep | instances | seconds | instances/s | MB/s |"
echo "|---|---|---|---|---|---|"
for rep in $(seq "$REPS"); do
  echo "<!-- rep $rep: load average $(cut -d' ' -f1-3 /proc/loadavg) -->"
  for rx in storescp orthanc cosilo cosilo-spool cosilo-nofsync; do
    OUT="$WORK/$rx-$rep"; mkdir -p "$OUT"
    case "$rx" in
      storescp)
        storescp -aet STORESCP -od "$OUT" "$PORT" & RX_PID=$!
        AE=STORESCP ;;
      orthanc)
        HTTP=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
        cat >"$OUT/orthanc.json" <<JSON
{ "Name": "bench", "StorageDirectory": "$OUT/storage", "IndexDirectory": "$OUT/index",
  "DicomAet": "ORTHANC", "DicomPort": $PORT, "HttpPort": $HTTP, "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false, "DicomCheckCalledAet": false, "Plugins": [] }
JSON
        /usr/sbin/Orthanc "$OUT/orthanc.json" >"$OUT/orthanc.log" 2>&1 & RX_PID=$!
        AE=ORTHANC ;;
      *)
        FLAG=""
        [ "$rx" = cosilo ] && FLAG=--deid
        [ "$rx" = cosilo-nofsync ] && FLAG=--no-fsync
        ./target/release/examples/store_bench "$OUT" "$PORT" COSILO $FLAG <"$WORK/ctl" >/dev/null & RX_PID=$!
        AE=COSILO ;;
    esac
    wait_port
    S=$(send "$AE")
    if [ "$rx" = orthanc ]; then
      GOT=$(find "$OUT/storage" -type f -path '*/*/*' ! -name '*.json' 2>/dev/null | wc -l)
    else
      GOT=$(find "$OUT" -path "$OUT/state" -prune -o \( -name '*.dcm' -o -name 'CT.*' \) -print | wc -l)
    fi
    kill "$RX_PID" 2>/dev/null || true; wait "$RX_PID" 2>/dev/null || true
    printf "| %s | %d | %d/%d | %.3f | %.0f | %.0f |\n" "$rx" "$rep" "$GOT" "$N" "$S" "$(echo "$N / $S" | bc -l)" "$(echo "$BYTES / $S / 1000000" | bc -l)"
    echo "$rx $S" >>"$WORK/times"
  done
done

# Medians per receiver (of the seconds), and the ratios of instances/s to Orthanc and storescp.
echo
echo "| receiver | median s | instances/s (median) | vs orthanc | vs storescp |"
echo "|---|---|---|---|---|"
python3 - "$WORK/times" "$N" <<'PY'
import statistics, sys
times = {}
for line in open(sys.argv[1]):
    rx, s = line.split()
    times.setdefault(rx, []).append(float(s))
n = int(sys.argv[2])
rate = {rx: n / statistics.median(v) for rx, v in times.items()}
for rx, v in times.items():
    print(f"| {rx} | {statistics.median(v):.3f} | {rate[rx]:.0f} | "
          f"{rate[rx] / rate['orthanc']:.2f}x | {rate[rx] / rate['storescp']:.2f}x |")
PY

#!/usr/bin/env bash
# The one command that sets up and runs every test: `scripts/test.sh`.
# Installs what the tests need (Debian packages, the ONNX Runtime library, Python reference tools,
# the real anatomy data), checks formatting and lints, then runs the whole workspace's tests.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

# Real peers the tests start themselves: an MQTT broker, a PACS, DICOM tools and a DICOM validator.
ensure_apt mosquitto orthanc dcmtk dicom3tools
ensure_python
ensure_ort

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

say "fetch real anatomy into $COSILO_CACHE"
cargo run --quiet --release -p cosilo-appliance -- data fetch

say "cargo test"
LOG="$(mktemp)"
cargo test --workspace --release 2>&1 | tee "$LOG"

# One closing line over every test binary (cargo's own last line is often a doc-test binary
# with nothing in it).
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$LOG"
rm -f "$LOG"

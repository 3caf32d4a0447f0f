#!/usr/bin/env bash
# The one command that sets up and runs every test: `scripts/test.sh`.
# Installs what the tests need (Debian packages, the ONNX Runtime library, Python reference tools,
# the real anatomy data), checks formatting and lints, then runs the whole workspace's tests.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

# Real peers the tests start themselves: an MQTT broker, a PACS, DICOM tools and a DICOM validator.
# The package test: lintian; the status page test: a real browser.
ensure_apt mosquitto orthanc dcmtk dicom3tools lintian chromium
ensure_python
ensure_ort
# The disk, at the start and the end: a full disk shows up as a linker's SIGBUS, not as ENOSPC.
say "disk: $(df -h . | tail -n 1)"

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
# NVML guard (feature `nvml`): lint it and run its test, which says "not available" without a driver.
cargo clippy -p cosilo-hardware --all-targets --features nvml --quiet -- -D warnings
cargo test -p cosilo-hardware --release --features nvml --quiet nvml

# The GPU build: the `cuda` feature of the training code (its library, tests and examples) must
# compile and pass clippy on this CPU-only machine. A CUDA 13.0 compiler and headers come from
# pinned wheels (scripts/setup-cuda.sh, cached); candle's kernels compile to PTX for sm_90. No link:
# docs/DEPENDENCIES.md ("The GPU build") says why a check, and what running it needs.
say "cargo clippy --features cuda (the GPU build compiles; no GPU here)"
(
  eval "$(bash scripts/setup-cuda.sh)"
  cargo clippy -p cosilo-train -p cosilo-appliance --all-targets --features cuda --quiet -- -D warnings
)

# One release build of every target (tests, examples, the `cosilo` binary); the steps below reuse
# it rather than re-resolving features with `-p` and linking second copies.
say "cargo test --workspace --release --no-run"
cargo test --workspace --release --no-run --quiet

say "fetch real anatomy into $COSILO_CACHE"
target/release/cosilo data fetch

say "the Debian package (images/test-package.sh)"
COSILO_DEB_PREBUILT=1 bash images/test-package.sh

say "cargo test"
LOG="$(mktemp)"
cargo test --workspace --release 2>&1 | tee "$LOG"

# The Python package: the abi3 wheel (maturin, sharing the workspace's target folder so only
# pyo3, numpy and the bindings compile on top), its lints, pytest and the notebook
# (python/tests/test_notebook.py runs examples/federation.ipynb headless with nbclient).
say "Python: cosilo wheel, pytest, examples/federation.ipynb"
cargo fmt --manifest-path python/Cargo.toml -- --check
CARGO_TARGET_DIR="$ROOT/target" cargo clippy --manifest-path python/Cargo.toml --release --quiet -- -D warnings
(cd python && CARGO_TARGET_DIR="$ROOT/target" "$(dirname "$COSILO_PYTHON")/maturin" build --release --strip --quiet -o "$ROOT/target/wheels")
"$COSILO_PYTHON" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$ROOT"/target/wheels/cosilo-*.whl
COSILO_BIN="$ROOT/target/release/cosilo" "$COSILO_PYTHON" -m pytest -q python/tests

# One closing line over every test binary (cargo's own last line is often a doc-test binary
# with nothing in it).
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$LOG"
rm -f "$LOG"
say "disk: $(df -h . | tail -n 1); target/: $(du -sh target | cut -f1)"

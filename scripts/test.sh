#!/usr/bin/env bash
# The one command that sets up and runs every test: `scripts/test.sh`.
# Installs what the tests need (Debian packages, the ONNX Runtime library, Python reference tools,
# the real anatomy data), checks formatting and lints, then runs the whole workspace's tests.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_apt   # apt lists for `apt-get download` (data fetch)
ensure_python
ensure_ort

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

say "fetch real anatomy into $COSILO_CACHE"
cargo run --quiet --release -p cosilo-appliance -- data fetch

say "cargo test"
cargo test --workspace --release 2>&1 | tee "${TMPDIR:-/tmp}/cosilo-test.log"

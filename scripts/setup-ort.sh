#!/usr/bin/env bash
# Installs the ONNX Runtime shared library the Cosilo SDK loads at run time, into .ort/ at the
# repository root (gitignored; .cargo/config.toml points ORT_DYLIB_PATH at it for cargo runs).
#
# The library comes from the official onnxruntime 1.31.1 wheel on the Python package index, fetched
# with pip (whatever Python runs pip, these flags select exactly one wheel), checked against its
# known SHA-256, and the library unpacked and checked against its own known SHA-256. Idempotent:
# an installed library whose checksum matches is kept.
#
# Usage: scripts/setup-ort.sh            (needs python3 with pip, and sha256sum)
set -euo pipefail

VERSION=1.31.1
WHEEL=onnxruntime-${VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl
WHEEL_SHA256=5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f
MEMBER=onnxruntime/capi/libonnxruntime.so.${VERSION}
LIB=libonnxruntime.so.${VERSION}
LIB_SHA256=fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.ort"

if [[ -f "$DEST/$LIB" ]] && echo "$LIB_SHA256  $DEST/$LIB" | sha256sum --check --status; then
    echo "ONNX Runtime $VERSION already installed: $DEST/$LIB"
    exit 0
fi

if [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]]; then
    echo "error: scripts/setup-ort.sh installs the Linux x86_64 library; this is $(uname -s)-$(uname -m)." >&2
    echo "       Install ONNX Runtime $VERSION yourself and set ORT_DYLIB_PATH to the library." >&2
    exit 1
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "Downloading $WHEEL with pip..."
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp \
    "onnxruntime==$VERSION" -d "$TMP"

if [[ ! -f "$TMP/$WHEEL" ]]; then
    echo "error: pip did not produce $WHEEL (got: $(ls "$TMP"))" >&2
    exit 1
fi
echo "$WHEEL_SHA256  $TMP/$WHEEL" | sha256sum --check --status || {
    echo "error: $WHEEL has SHA-256 $(sha256sum "$TMP/$WHEEL" | cut -d' ' -f1), expected $WHEEL_SHA256" >&2
    exit 1
}

python3 - "$TMP/$WHEEL" "$MEMBER" "$TMP/$LIB" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY

echo "$LIB_SHA256  $TMP/$LIB" | sha256sum --check --status || {
    echo "error: $MEMBER has SHA-256 $(sha256sum "$TMP/$LIB" | cut -d' ' -f1), expected $LIB_SHA256" >&2
    exit 1
}

# Copy beside the destination, then rename: a reader never sees a half-written library.
mkdir -p "$DEST"
cp "$TMP/$LIB" "$DEST/.$LIB.tmp"
chmod 0755 "$DEST/.$LIB.tmp"
sync "$DEST/.$LIB.tmp"
mv -f "$DEST/.$LIB.tmp" "$DEST/$LIB"
echo "Installed ONNX Runtime $VERSION: $DEST/$LIB"

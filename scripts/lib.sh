# Shared setup for Cosilo's scripts: sourced, not run. Everything here is idempotent and offline
# apart from the package registries' ordinary clients (apt-get, pip, cargo).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export COSILO_CACHE="${COSILO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cosilo}"
export COSILO_PYTHON="${COSILO_PYTHON:-$ROOT/.venv/bin/python}"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$ROOT/.ort/libonnxruntime.so.1.31.1}"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root for: $*" >&2; return 1; fi
}

# Debian packages the project's scripts and tests use. `apt-get update` runs once, when a package
# is missing or apt has no lists yet (apt-get download needs them too).
ensure_apt() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ] || [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
    say "apt-get update"
    as_root apt-get update -qq
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

# A virtual environment with the Python tools the tests and benchmarks use as independent
# references (the ONNX checker, ONNX Runtime's Python API, nibabel).
ensure_python() {
  if [ ! -x "$COSILO_PYTHON" ]; then
    say "creating $ROOT/.venv"
    python3 -m venv "$ROOT/.venv" 2>/dev/null || { ensure_apt python3-venv; python3 -m venv "$ROOT/.venv"; }
  fi
  if ! "$COSILO_PYTHON" -c 'import onnx, onnxruntime, numpy, nibabel, pydicom, highdicom, pynetdicom, maturin, pytest, nbclient, nbformat, ipykernel, matplotlib' 2>/dev/null; then
    say "pip install the Python reference tools"
    # maturin builds the `cosilo` wheel (python/); pytest, nbclient (+ nbformat, ipykernel) and
    # matplotlib run its tests and examples/federation.ipynb.
    "$COSILO_PYTHON" -m pip install -q --disable-pip-version-check \
      onnx==1.23.2 onnxruntime==1.31.1 numpy==2.4.6 nibabel==5.4.2 \
      pydicom==3.0.2 highdicom==0.28.2 pynetdicom==3.0.4 \
      maturin==1.16.0 pytest==9.2.0 nbclient==0.11.0 nbformat==5.11.1 ipykernel==7.4.0 \
      matplotlib==3.11.2
  fi
}

ensure_ort() { bash "$ROOT/scripts/setup-ort.sh"; }

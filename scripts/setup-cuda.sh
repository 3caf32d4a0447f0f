#!/usr/bin/env bash
# Installs a CUDA 13 toolkit for building the `cuda` feature of the training code on a machine
# without a GPU (CI, a developer laptop), from NVIDIA's CUDA wheels on the Python package registry,
# into a cache outside git. Idempotent: a second run checks the stamp and prints the environment.
#
#   scripts/setup-cuda.sh            compiler + headers: enough for `cargo check` / `cargo clippy`
#                                    of the `cuda` feature (candle's kernels are compiled to PTX by
#                                    nvcc in candle-kernels' build script; nothing is linked)
#   scripts/setup-cuda.sh --link     also the link libraries (cuBLAS, cuRAND, NVRTC: ~600 MB of
#                                    wheels) and a stub libcuda.so, for `cargo build` of binaries
#
# Then: eval "$(scripts/setup-cuda.sh [--link])"   (it prints `export` lines on stdout only)
#
# Choices (docs/DEPENDENCIES.md, "The GPU build"):
# - CUDA 13.0 wheels: the reference GPU appliance (H200) runs driver 580, whose CUDA is 13.0.
#   candle ships its kernels as PTX that the driver JIT-compiles at start, and a driver refuses PTX
#   of a newer ISA than its own CUDA version (CUDA_ERROR_UNSUPPORTED_PTX_VERSION), so the nvcc must
#   not be newer than the oldest driver the appliance supports: 13.0 for driver 580 (13.5's nvcc
#   builds fine but its PTX would need a newer driver). The -cu12 nvcc wheel has no `nvcc` binary.
# - CUDARC_CUDA_VERSION=13000: the driver-API bindings cudarc 0.19.10 uses (it would read nvcc's
#   version otherwise, and panics on 13.5, which it does not know); 13.0 is what driver 580 offers.
# - CUDA_COMPUTE_CAP: candle compiles its kernels to PTX for one architecture, which the driver
#   JIT-compiles at start for the GPU it finds; PTX runs on that architecture and newer ones only.
#   90 (Hopper: H100/H200) for the x86-64 data-centre build; Jetson Orin (87) is an aarch64 build of
#   its own and sets CUDA_COMPUTE_CAP=87 (this script is x86-64 only: the wheels' hashes are).
# - The stub libcuda.so (--link) exists only so that the linker can finish: its functions all
#   return CUDA_ERROR_NO_DEVICE. At run time the driver's real libcuda.so.1 must be found instead:
#   never put the stub directory on LD_LIBRARY_PATH of a GPU machine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${COSILO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cosilo}"
DIR="$CACHE/cuda-13.0"
CAP="${CUDA_COMPUTE_CAP:-90}"
LINK=0
# pip from the project's virtual environment where there is one (scripts/lib.sh ensure_python;
# Debian's python3 has no pip module), else python3's.
PY="${COSILO_PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
[ "${1:-}" = "--link" ] && LINK=1

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

if [ "$(uname -m)" != x86_64 ]; then
    echo "setup-cuda.sh: the pinned wheels are x86-64; on $(uname -m) install CUDA from the vendor's image" >&2
    exit 1
fi

# name==version sha256 (the x86-64 manylinux wheel of each)
BASE_WHEELS="
nvidia-cuda-nvcc==13.0.88 56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03
nvidia-cuda-crt==13.0.88 2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4
nvidia-nvvm==13.0.88 c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0
nvidia-cuda-runtime==13.0.96 7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548
nvidia-cuda-cccl==13.0.85 e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649
"
LINK_WHEELS="
nvidia-cublas==13.10.0.20 dcc6d63884c53d07e267ce7e6feac17b2538cebaafec5db865736c3e28e4dc84
nvidia-curand==10.4.4.72 25c3457ae7a224fdd484dab90b0fc5dc0e842fab5db3012afa4a5bd2af4eb7e5
nvidia-cuda-nvrtc==13.0.88 ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575
"

# Downloads (with pinned hashes) and unpacks a set of wheels into $DIR/root, once.
install_wheels() {
    local set="$1" list="$2"
    local stamp="$DIR/root/.installed-$set"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(echo "$list" | sha256sum)" ]; then
        return
    fi
    mkdir -p "$DIR/wheels" "$DIR/root"
    local req="$DIR/wheels/requirements-$set.txt"
    echo "$list" | awk 'NF == 2 { print $1 " --hash=sha256:" $2 }' >"$req"
    say "pip download the CUDA 13 $set wheels into $DIR/wheels"
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --require-hashes -r "$req" -d "$DIR/wheels" >&2
    local name
    for name in $(echo "$list" | awk 'NF == 2 { print $1 }'); do
        local file
        file="$(ls "$DIR/wheels/$(echo "${name%%==*}" | tr - _)-${name##*==}-"*.whl)"
        say "unpack $(basename "$file")"
        "$PY" -m zipfile -e "$file" "$DIR/root" >&2
    done
    echo "$list" | sha256sum >"$stamp"
}

install_wheels base "$BASE_WHEELS"
CU="$DIR/root/nvidia/cu13"
chmod +x "$CU"/bin/* "$CU"/nvvm/bin/* 2>/dev/null || true

if [ "$LINK" = 1 ]; then
    install_wheels link "$LINK_WHEELS"
    # The wheels ship only versioned libraries (libcublas.so.13); the linker wants lib*.so.
    for lib in "$CU"/lib/lib*.so.*; do
        base="${lib%%.so.*}.so"
        [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
    done
    # The stub driver: every cu* function cudarc's driver bindings can call, each returning
    # CUDA_ERROR_NO_DEVICE (100). Its names come from the cudarc source cargo fetched.
    if [ ! -f "$DIR/stub/libcuda.so" ]; then
        say "building the stub libcuda.so"
        (cd "$ROOT" && cargo fetch --quiet >&2)
        sys="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10/src/driver/sys/mod.rs | head -1)"
        mkdir -p "$DIR/stub"
        grep -oP 'pub unsafe fn \Kcu\w+(?=\()' "$sys" | sort -u |
            awk '{ print "int " $1 "(void) { return 100; }" }' >"$DIR/stub/stub.c"
        gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$DIR/stub/libcuda.so" "$DIR/stub/stub.c"
        ln -sf libcuda.so "$DIR/stub/libcuda.so.1"
    fi
fi

"$CU/bin/nvcc" --version >&2

cat <<EOF
export PATH="$CU/bin:\$PATH"
export CUDA_PATH="$CU"
export CUDA_ROOT="$CU"
export CUDA_COMPUTE_CAP=$CAP
export CUDARC_CUDA_VERSION=13000
EOF
if [ "$LINK" = 1 ]; then
    echo "export RUSTFLAGS=\"\${RUSTFLAGS:-} -L native=$DIR/stub -L native=$CU/lib\""
    echo "# at run time, on a GPU machine: LD_LIBRARY_PATH=<the cuBLAS/cuRAND/NVRTC libraries> (not $DIR/stub)"
fi

#!/bin/sh
# Build an aarch64 Debian userland run under QEMU user mode (no binfmt, no second stage), in two layers:
#   ONNX:       numpy + onnxruntime (~390 MB)                                           marker ROOT/.complete
#   ExecuTorch: executorch 1.5.1 + torch 2.13.0 aarch64 wheels (~1.2 GB more; EMU_EXECUTORCH=0 skips it)
#               marker ROOT/.executorch-complete
# The aarch64 torch wheel is a CUDA build whose libraries link the CUDA libraries; ExecuTorch never calls CUDA, so
# those are replaced by small stand-ins with the same sonames and symbols (cuda_stubs.py) instead of ~2.9 GB of
# vendor wheels. Wheels are cached in $(dirname ROOT)/wheels-arm64, outside git.
# Usage: build-arm64.sh ROOT [HOST_PYTHON]. Idempotent: complete layers are kept.
set -eu
ROOT=$1
PY=${2:-python3}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
HERE=$(dirname "$0")
EMU=$(dirname "$ROOT")
SITE="$ROOT/usr/local/lib/python3.11/dist-packages"
PIPARM="--only-binary=:all: --python-version 3.11 --implementation cp --platform manylinux_2_28_aarch64 \
    --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64"
# qemu-user: the dynamically linked build loads TCG plugins (the static one cannot): instruction counts.
# gcc-aarch64-linux-gnu: builds the CUDA stand-ins for the ExecuTorch layer.
apt_missing=""
command -v qemu-aarch64-static >/dev/null || apt_missing="$apt_missing qemu-user-static"
command -v qemu-aarch64 >/dev/null || apt_missing="$apt_missing qemu-user"
command -v debootstrap >/dev/null || apt_missing="$apt_missing debootstrap"
if [ "${EMU_EXECUTORCH:-1}" = 1 ] && ! command -v aarch64-linux-gnu-gcc >/dev/null; then
    apt_missing="$apt_missing gcc-aarch64-linux-gnu"
fi
if [ -n "$apt_missing" ]; then
    apt-get install -y --no-install-recommends $apt_missing || { apt-get update && apt-get install -y \
        --no-install-recommends $apt_missing; }
fi
PLUGIN=$EMU/libinsncount.so
mkdir -p "$EMU"  # a fresh checkout has no .emu/ yet
if [ ! -f "$PLUGIN" ] && command -v cc >/dev/null; then
    cc -O2 -shared -fPIC -o "$PLUGIN" "$HERE/insn_count.c"
fi
if [ -f "$ROOT/.complete" ] && [ ! -e "$ROOT/usr/lib/aarch64-linux-gnu/libatomic.so.1" ] \
    && [ "${EMU_EXECUTORCH:-1}" = 1 ]; then
    echo "emu root predates the ExecuTorch layer (no libatomic): rebuilding"
    rm -f "$ROOT/.complete"
fi
if [ -f "$ROOT/.complete" ]; then
    echo "emu root ready: $ROOT"
else
    start=$(date +%s)
    rm -rf "$ROOT" && mkdir -p "$ROOT"
    debootstrap --foreign --arch=arm64 --variant=minbase --include=python3,libatomic1 bookworm "$ROOT" "$MIRROR"
    # the first stage only downloads: unpack every .deb instead of running the (emulated) second stage
    for deb in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
    rm -f "$ROOT"/var/cache/apt/archives/*.deb
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet --no-deps --target "$SITE" $PIPARM \
        numpy==2.4.6 onnxruntime==1.32.0 flatbuffers packaging protobuf==7.36.2
    # QEMU 7.2 does not emulate /proc/cpuinfo for aarch64 and onnxruntime's cpuinfo crashes without one: a fake
    # Cortex-A76 file, matching QEMU_CPU=cortex-a76 (the default 'max' CPU advertises SVE/SME and runs far slower)
    mkdir -p "$ROOT/proc"
    for i in 0 1; do
        printf 'processor\t: %s\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n' $i
    done > "$ROOT/proc/cpuinfo"
    echo "onnx layer built in $(( $(date +%s) - start )) s, $(du -sm "$ROOT" | cut -f1) MB" | tee "$ROOT/.build-info"
    touch "$ROOT/.complete"
fi

[ "${EMU_EXECUTORCH:-1}" = 1 ] || exit 0
[ -f "$ROOT/.executorch-complete" ] && { echo "emu executorch layer ready: $ROOT"; exit 0; }
start=$(date +%s)
# pinned: the host's executorch and torch, and the pure-Python modules torch and executorch import
# (onnxruntime-genai: the LLM runner for ONNX folders, for counting ours beside its builder's models)
ET_WHEELS="torch==2.13.0 executorch==1.5.1 filelock==4.3.1 typing-extensions==4.16.0 sympy==1.14.0 mpmath==1.3.0 \
    networkx==3.6.1 jinja2==3.1.6 markupsafe==3.0.4 fsspec==2026.9.0 pyyaml==6.0.4 ruamel.yaml==0.19.1 \
    tabulate==0.10.0 onnxruntime-genai==0.18.0"
mkdir -p "$EMU/wheels-arm64"
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --no-deps --dest "$EMU/wheels-arm64" $PIPARM $ET_WHEELS
# shellcheck disable=SC2086
"$PY" -m pip install --quiet --no-deps --no-index --find-links "$EMU/wheels-arm64" --target "$SITE" --upgrade \
    $PIPARM $ET_WHEELS
"$PY" "$HERE/cuda_stubs.py" "$ROOT" "$EMU/cuda-stubs" aarch64-linux-gnu-gcc
for lib in "$EMU"/cuda-stubs/lib*; do
    case $lib in *.c|*.map) ;; *) cp "$lib" "$ROOT/usr/lib/aarch64-linux-gnu/" ;; esac
done
echo "executorch layer built in $(( $(date +%s) - start )) s, root now $(du -sm "$ROOT" | cut -f1) MB" \
    | tee -a "$ROOT/.build-info"
touch "$ROOT/.executorch-complete"

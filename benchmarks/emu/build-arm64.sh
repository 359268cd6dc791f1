#!/bin/sh
# Build an aarch64 Debian userland with numpy + onnxruntime, run under QEMU user mode (no binfmt, no second stage).
# Usage: build-arm64.sh ROOT [HOST_PYTHON]. Idempotent: an existing complete ROOT (ROOT/.complete) is kept.
set -eu
ROOT=$1
PY=${2:-python3}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
# qemu-user: the dynamically linked build loads TCG plugins (the static one cannot): instruction counts
if ! command -v qemu-aarch64-static >/dev/null || ! command -v qemu-aarch64 >/dev/null \
    || ! command -v debootstrap >/dev/null; then
    apt-get install -y --no-install-recommends qemu-user-static qemu-user debootstrap
fi
PLUGIN=$(dirname "$ROOT")/libinsncount.so
mkdir -p "$(dirname "$ROOT")"  # a fresh checkout has no .emu/ yet
if [ ! -f "$PLUGIN" ] && command -v cc >/dev/null; then
    cc -O2 -shared -fPIC -o "$PLUGIN" "$(dirname "$0")/insn_count.c"
fi
[ -f "$ROOT/.complete" ] && { echo "emu root ready: $ROOT"; exit 0; }
start=$(date +%s)
rm -rf "$ROOT" && mkdir -p "$ROOT"
debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 bookworm "$ROOT" "$MIRROR"
# the first stage only downloads: unpack every .deb instead of running the (emulated) second stage
for deb in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
rm -f "$ROOT"/var/cache/apt/archives/*.deb
"$PY" -m pip install --quiet --no-deps --target "$ROOT/usr/local/lib/python3.11/dist-packages" --only-binary=:all: \
    --python-version 3.11 --implementation cp --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
    numpy==2.4.6 onnxruntime==1.32.0 flatbuffers packaging protobuf==7.36.2
# QEMU 7.2 does not emulate /proc/cpuinfo for aarch64 and onnxruntime's cpuinfo crashes without one: a fake
# Cortex-A76 file, matching QEMU_CPU=cortex-a76 (the default 'max' CPU advertises SVE/SME and runs far slower)
mkdir -p "$ROOT/proc"
for i in 0 1; do
    printf 'processor\t: %s\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n' $i
done > "$ROOT/proc/cpuinfo"
echo "built in $(( $(date +%s) - start )) s, $(du -sm "$ROOT" | cut -f1) MB" | tee "$ROOT/.build-info"
touch "$ROOT/.complete"

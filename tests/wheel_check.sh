#!/usr/bin/env bash
# The built wheel works on its own: build it from a clean copy of the source tree, install it (torch first, pinned,
# then the wheel under constraints.txt) in a fresh venv, and run the CLI on the shipped model from a folder outside
# the repository, so that nothing can come from the checkout or an editable install. Catches package data missing from
# pyproject's [tool.setuptools.package-data] (a held-out split or checkpoint file that only the repository has).
#
#   bash tests/wheel_check.sh        (`make wheel-check`; PY=python3.11 by default, as in the Makefile)
#
# Downloads nothing but PyPI packages (the pip cache serves them after `make install`). Removes its temp folders.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PY:-python3.11}
BUILD_PIP="$REPO/.venv/bin/pip"
START=$SECONDS

fail() {
    echo "wheel check: FAILED: $*" >&2
    exit 1
}

[[ -x $BUILD_PIP ]] || fail "$BUILD_PIP missing: run \`make install\` first"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/pit-wheel-check.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
case "$TMP/" in "$REPO"/*) fail "temp folder $TMP lies inside the repository (set TMPDIR elsewhere)" ;; esac

# 1. A copy of what a clone holds (tracked files plus new, not ignored ones): no build/, *.egg-info or .venv from the
# checkout can leak stale files into the wheel, and the build writes nothing into the repository.
mkdir "$TMP/src"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (
        cd "$REPO"
        git ls-files -z --cached --others --exclude-standard |
            while IFS= read -r -d '' f; do [[ -e $f || -L $f ]] && printf '%s\0' "$f"; done |
            tar --null -T - -cf -
    ) | tar -xf - -C "$TMP/src"
else
    tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' --exclude=./out \
        --exclude=./runs --exclude=./.emu --exclude=./.peers --exclude=__pycache__ -cf - . | tar -xf - -C "$TMP/src"
fi

# 2. The wheel, with the repository venv's setuptools (or an isolated build env when that fails).
echo "wheel check: building the wheel ($((SECONDS - START))s)"
if ! "$BUILD_PIP" wheel --quiet --no-deps --no-build-isolation -w "$TMP/dist" "$TMP/src"; then
    echo "wheel check: --no-build-isolation failed, building in an isolated env" >&2
    rm -rf "$TMP/dist"
    "$BUILD_PIP" wheel --quiet --no-deps -w "$TMP/dist" "$TMP/src"
fi
WHEELS=("$TMP"/dist/pit_export-*.whl)
[[ ${#WHEELS[@]} -eq 1 && -f ${WHEELS[0]} ]] || fail "expected one pit_export wheel in $TMP/dist"
WHEEL=${WHEELS[0]}

# Every file in the models/ subfolders (held-out split, shipped checkpoints) must be in the wheel.
"$REPO/.venv/bin/python" - "$WHEEL" "$TMP/src/models" <<'EOF'
import sys
import zipfile
from pathlib import Path

wheel, models = sys.argv[1], Path(sys.argv[2])
names = set(zipfile.ZipFile(wheel).namelist())
want = sorted(
    f"pit_export/models/{p.relative_to(models).as_posix()}"
    for d in models.iterdir()
    if d.is_dir() and d.name != "__pycache__"
    for p in d.rglob("*")
    if p.is_file() and "__pycache__" not in p.parts
)
missing = [n for n in want if n not in names]
if missing:
    sys.exit("wheel check: FAILED: the wheel lacks " + ", ".join(missing))
print(f"wheel check: {Path(wheel).name} carries all {len(want)} data files under models/")
EOF

# 3. A fresh venv: torch first, pinned (never a resolver's pick), then the wheel under the repository's constraints.
echo "wheel check: installing into a fresh venv ($((SECONDS - START))s)"
"$PY" -m venv "$TMP/venv"
V="$TMP/venv/bin"
"$V/pip" install --quiet --upgrade pip
"$V/pip" install --quiet torch==2.13.0
"$V/pip" install --quiet -c "$REPO/constraints.txt" "$WHEEL"

# 4. From a folder outside the repository, with nothing of the repository on sys.path.
mkdir "$TMP/work"
cd "$TMP/work"
unset PYTHONPATH PYTHONHOME
export PYTHONNOUSERSITE=1
MODEL=$("$V/python" - "$REPO" "$TMP/venv" <<'EOF'
import pathlib
import sys

import pit_export
import pit_export.models
import pit_export.runtimes

repo, venv = (pathlib.Path(a).resolve() for a in sys.argv[1:3])
for m in (pit_export, pit_export.models, pit_export.runtimes):
    f = pathlib.Path(m.__file__).resolve()
    if not f.is_relative_to(venv):
        sys.exit(f"wheel check: FAILED: {m.__name__} imported from {f}, not from the fresh venv")
on_path = [p for p in sys.path if p and pathlib.Path(p).resolve().is_relative_to(repo)]
if on_path:
    sys.exit(f"wheel check: FAILED: the repository is on sys.path: {on_path}")
print(pathlib.Path(pit_export.models.__file__).parent / "pit-tiny")
EOF
)
[[ -d $MODEL ]] || fail "shipped model folder $MODEL missing"

PASSED=0
check() {
    echo "wheel check: pit-export $* ($((SECONDS - START))s)"
    "$V/pit-export" "$@" || fail "pit-export $* (exit $?)"
    PASSED=$((PASSED + 1))
}
check inspect pit-tiny  # a shipped model, by name
check validate pit-tiny --layout untied,shared-z --n-windows 1 --n-greedy 4
check export "$MODEL" --target onnx-cpu --scheme fp32 --n-windows 1 --n-greedy 4 --out "$TMP/o"
[[ -f $TMP/o/onnx-cpu/model.onnx ]] || fail "export wrote no $TMP/o/onnx-cpu/model.onnx"

echo "wheel check: $PASSED commands passed outside the repository ($((SECONDS - START))s)"
echo "wheel-check: $PASSED passed, 0 failed"

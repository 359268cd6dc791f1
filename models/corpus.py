"""The training corpus: CPython's standard-library sources, present on every machine with Python 3.11.

License: Python Software Foundation License (redistribution permitted). Tests are excluded. The split is by file,
decided by a hash of the relative path, so it is stable across machines; the held-out split ships with the repo
(`models/data/heldout.txt`) so evaluation never depends on the local Python build.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
HELDOUT = DATA_DIR / "heldout.txt"
DOC_SEP = "\n\x1e\n"  # record separator between files in the shipped held-out text
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__", "ensurepip", "turtledemo"}


def stdlib_files(root: Path | None = None) -> list[Path]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_heldout(relpath: str, percent: int = 4) -> bool:
    return int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % 100 < percent


def build_corpus(max_train_bytes: int = 12_000_000, max_heldout_bytes: int = 200_000) -> tuple[list[str], list[str]]:
    """(train documents, held-out documents), deterministic for a given stdlib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held, nt, nh = [], [], 0, 0
    for p in stdlib_files(root):
        rel = p.relative_to(root).as_posix()
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) < 200:
            continue
        if is_heldout(rel):
            if nh < max_heldout_bytes:  # cap each file so the split spans many modules
                held.append(text[: min(20_000, max_heldout_bytes - nh)])
                nh += len(held[-1])
        elif nt < max_train_bytes:
            train.append(text)
            nt += len(text)
    return train, held


def load_heldout() -> list[str]:
    return HELDOUT.read_text(encoding="utf-8").split(DOC_SEP)


def save_heldout(docs: list[str]) -> None:
    DATA_DIR.mkdir(exist_ok=True)
    HELDOUT.write_text(DOC_SEP.join(docs), encoding="utf-8")

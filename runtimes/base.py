"""The Session protocol: what validate, generate and bench see of any runtime. They never branch on the backend."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Session(Protocol):
    name: str
    vocab_size: int
    hidden_size: int
    max_seq_len: int

    def prefill(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        """Run tokens [n] at positions start_pos.. ; returns logits [n, V]. Positions >= start_pos are overwritten."""

    def decode(self, token: int, pos: int) -> np.ndarray:
        """One token at position pos; returns logits [V]."""

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """Rows of the deployed embedding E, [n, d]."""

    def unembed(self, hidden: np.ndarray) -> np.ndarray:
        """The deployed PIT head h T Z^T without the final-norm gain, [n, V]."""

    def reset(self) -> None: ...

    def close(self) -> None: ...


# backend name (as written in an artifact's pit_export.json) -> opener(path, **options) -> Session
OPENERS: dict[str, Callable[..., Session]] = {}


def register(backend: str):
    def deco(fn):
        OPENERS[backend] = fn
        return fn

    return deco


def greedy_generate(session: Session, prompt: list[int], max_new: int, stop: set[int] = frozenset()) -> list[int]:
    """Greedy decoding through prefill + decode: the generation every backend is compared on."""
    if not prompt:
        raise ValueError("empty prompt")
    n = min(max_new, session.max_seq_len - len(prompt))
    session.reset()
    logits = session.prefill(np.asarray(prompt, dtype=np.int64), 0)[-1]
    out: list[int] = []
    for i in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        if tok in stop or i == n - 1:
            break
        logits = session.decode(tok, len(prompt) + i)
    return out


def artifact_backend(path: Path) -> str | None:
    import json

    meta = Path(path) / "pit_export.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("backend")
    return None

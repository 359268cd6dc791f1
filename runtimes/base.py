"""The Session protocol: what validate, generate and bench see of any runtime. They never branch on the backend."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Session(Protocol):
    name: str
    vocab_size: int
    hidden_size: int
    max_seq_len: int

    def prefill(self, tokens: np.ndarray, start_pos: int, last_only: bool = False) -> np.ndarray:
        """Run tokens [n] at positions start_pos.. ; returns logits [n, V], or [1, V] for the last position with
        last_only (a runtime whose graph can skip the head for the other rows does). Positions >= start_pos are
        overwritten."""

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


class CheckedSession:
    """Any Session behind argument checks: an out-of-range token or a position past the context is a one-line
    BadInput here, instead of a native crash, an out-of-bounds read or a silently clamped index in the runtime."""

    def __init__(self, inner: Session):
        self.inner = inner

    def __getattr__(self, name):  # name, vocab_size, scheme, ... of the wrapped session
        return getattr(self.inner, name)

    def _tokens(self, tokens, what: str) -> np.ndarray:
        from pit_export.errors import BadInput

        t = np.asarray(tokens)
        if t.ndim != 1 or t.size == 0 or not np.issubdtype(t.dtype, np.integer):
            raise BadInput(
                f"{self.inner.name}: {what} takes a non-empty 1-D integer token array, got {t.dtype}{t.shape}"
            )
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= self.inner.vocab_size:
            bad = lo if lo < 0 else hi
            raise BadInput(f"{self.inner.name}: token id {bad} out of range [0, {self.inner.vocab_size})")
        return t.astype(np.int64)

    def _positions(self, start: int, n: int) -> None:
        from pit_export.errors import BadInput

        if int(start) < 0 or int(start) + n > self.inner.max_seq_len:
            raise BadInput(
                f"{self.inner.name}: positions {start}..{int(start) + n - 1} outside the context "
                f"[0, {self.inner.max_seq_len})"
            )

    def prefill(self, tokens, start_pos: int, last_only: bool = False) -> np.ndarray:
        t = self._tokens(tokens, "prefill")
        self._positions(start_pos, len(t))
        return self.inner.prefill(t, int(start_pos), last_only=last_only)

    def decode(self, token: int, pos: int) -> np.ndarray:
        t = self._tokens([token], "decode")
        self._positions(pos, 1)
        return self.inner.decode(int(t[0]), int(pos))

    def embed(self, tokens) -> np.ndarray:
        return self.inner.embed(self._tokens(tokens, "embed"))

    def unembed(self, hidden) -> np.ndarray:
        from pit_export.errors import BadInput

        h = np.asarray(hidden, dtype=np.float32)
        if h.ndim != 2 or h.shape[1] != self.inner.hidden_size or h.shape[0] == 0:
            raise BadInput(
                f"{self.inner.name}: unembed takes [n, {self.inner.hidden_size}] hidden states, got {h.shape}"
            )
        if not np.isfinite(h).all():
            raise BadInput(f"{self.inner.name}: unembed input has non-finite values")
        return self.inner.unembed(h)

    def reset(self) -> None:
        self.inner.reset()

    def close(self) -> None:
        self.inner.close()


@contextmanager
def quiet_native_stderr():
    """Runtimes' C++ info logs (cpuinfo probing, thread-pool sizes) write straight to fd 2 and would bury the CLI's
    output; muted while a runtime loads, unless PIT_EXPORT_DEBUG is set (the CLI's --debug sets it)."""
    if os.environ.get("PIT_EXPORT_DEBUG"):
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def decode_loop(
    session: Session, prompt: list[int], max_new: int, stop: set[int], pick: Callable[[np.ndarray], int]
) -> list[int]:
    """Prefill the prompt, then up to max_new tokens (never past the context), each chosen by pick(logits [V]); a stop
    token ends it and is included."""
    if not prompt:
        raise ValueError("empty prompt")
    n = min(max_new, session.max_seq_len - len(prompt))
    session.reset()
    logits = session.prefill(np.asarray(prompt, dtype=np.int64), 0, last_only=True)[-1]
    out: list[int] = []
    for i in range(n):
        tok = pick(logits)
        out.append(tok)
        if tok in stop or i == n - 1:
            break
        logits = session.decode(tok, len(prompt) + i)
    return out


def greedy_generate(session: Session, prompt: list[int], max_new: int, stop: set[int] = frozenset()) -> list[int]:
    """Greedy decoding through prefill + decode: the generation every backend is compared on."""
    return decode_loop(session, prompt, max_new, stop, lambda logits: int(np.argmax(logits)))


def artifact_backend(path: Path) -> str | None:
    """The backend an artifact folder names in its pit_export.json (None: not an artifact folder)."""
    from pit_export.models.checkpoint import CheckpointError, read_json

    meta = Path(path) / "pit_export.json"
    if not meta.is_file():
        return None
    doc = read_json(meta, "artifact manifest", 16 << 20)
    backend = doc.get("backend") if isinstance(doc, dict) else None
    if not isinstance(backend, str):
        raise CheckpointError(f"{meta}: names no backend")
    return backend

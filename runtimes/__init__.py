"""One adapter per runtime behind the Session protocol (base.py). `open_session` picks by artifact metadata."""

from __future__ import annotations

import importlib
from pathlib import Path

from .base import OPENERS, CheckedSession, Session, artifact_backend, greedy_generate

# backend -> module that registers its opener; imported lazily so a missing runtime costs nothing until used
BACKEND_MODULES = {"torch": "pytorch", "executorch": "executorch", "onnx": "onnxruntime", "coreml": "coreml"}


def open_session(path, **options) -> Session:
    from pit_export.models.checkpoint import artifact_config

    from pit_export.errors import BadInput, Unavailable

    backend = artifact_backend(Path(path))
    if backend is None:
        raise BadInput(f"{path}: not an artifact folder (no pit_export.json)")
    if backend not in BACKEND_MODULES:
        raise BadInput(f"{path}: unknown backend {backend!r} (known: {sorted(BACKEND_MODULES)})")
    artifact_config(Path(path))  # a config the weights or this machine cannot hold fails here, not in a runtime
    try:
        importlib.import_module(f"{__name__}.{BACKEND_MODULES[backend]}")
    except ModuleNotFoundError as e:
        raise Unavailable(f"{path}: no {backend} runtime here ({e})") from None
    return CheckedSession(OPENERS[backend](path, **options))


__all__ = ["Session", "open_session", "greedy_generate", "OPENERS"]

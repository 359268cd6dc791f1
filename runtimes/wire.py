"""Length-prefixed frames between the host and a Session served by another Python (remote_runner.py's serve mode):
a u32 header length, a JSON header, then an .npy array when the header says "array": true. numpy only."""

from __future__ import annotations

import io
import json
import struct

import numpy as np


def _read(f, n: int) -> bytes:
    b = f.read(n)
    if b is None or len(b) != n:
        raise EOFError("the other side closed the channel")
    return b


def recv(f) -> tuple[dict, np.ndarray | None]:
    (n,) = struct.unpack("<I", _read(f, 4))
    head = json.loads(_read(f, n))
    arr = None
    if head.get("array"):
        (m,) = struct.unpack("<Q", _read(f, 8))
        arr = np.load(io.BytesIO(_read(f, m)), allow_pickle=False)
    return head, arr


def send(f, head: dict, arr: np.ndarray | None = None) -> None:
    h = json.dumps(head | {"array": arr is not None}).encode()
    f.write(struct.pack("<I", len(h)) + h)
    if arr is not None:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
        f.write(struct.pack("<Q", buf.tell()) + buf.getvalue())
    f.flush()

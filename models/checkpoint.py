"""Checkpoint folder = config.json + model.safetensors + tokenizer.json. Loading checks what it loads.

Every violation raises CheckpointError with one line that names the tensor and the number.
Weights are read with safetensors only (never unpickled).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer

from .pit import ModelConfig, Transformer, expected_shapes

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
# Z^T Z = I is checked at fp32 resolution: a QR/polar factor stored in fp32 deviates by ~sqrt(V) * 2^-24.
ORTHO_TOL = 1e-4


class CheckpointError(ValueError):
    """A checkpoint that cannot be used. The message is one line, fit for a CLI."""


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    model: Transformer
    tokenizer: Tokenizer
    ortho_error: float | None  # max |Z^T Z - I| for PIT checkpoints

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))


def orthonormality_error(z: torch.Tensor) -> float:
    z = z.double()
    return (z.T @ z - torch.eye(z.shape[1], dtype=torch.float64)).abs().max().item()


def check_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> float | None:
    """Shapes vs config, finiteness, PIT invariants. Returns max |Z^T Z - I| for PIT."""
    want = expected_shapes(cfg)
    for name in sorted(set(want) - set(tensors)):
        raise CheckpointError(f"tensor {name} missing (expected shape {list(want[name])})")
    for name in sorted(set(tensors) - set(want)):
        raise CheckpointError(f"unexpected tensor {name} {list(tensors[name].shape)} for tying={cfg.tying}")
    for name, t in tensors.items():
        if tuple(t.shape) != want[name]:
            raise CheckpointError(f"tensor {name} has shape {list(t.shape)}, config implies {list(want[name])}")
        if not t.is_floating_point():
            raise CheckpointError(f"tensor {name} has dtype {t.dtype}, expected a float dtype")
        bad = (~torch.isfinite(t)).sum().item()
        if bad:
            raise CheckpointError(f"tensor {name} has {bad} non-finite values")
    if cfg.tying != "pit":
        return None
    l = tensors["pit.l"].double()
    upper = torch.triu(l, 1).abs().max().item()
    if upper > 0:
        raise CheckpointError(f"tensor pit.l is not lower-triangular (max |upper| = {upper:.3g})")
    dmin = torch.diagonal(l).min().item()
    if dmin <= 0:
        raise CheckpointError(f"tensor pit.l has a non-positive diagonal (min = {dmin:.3g}); T = L L^T is not SPD")
    err = orthonormality_error(tensors["pit.z"])
    if err > ORTHO_TOL:
        raise CheckpointError(f"tensor pit.z is not orthonormal: max |Z^T Z - I| = {err:.3g} > {ORTHO_TOL:g}")
    return err


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    for f in (CONFIG, WEIGHTS, TOKENIZER):
        if not (path / f).is_file():
            raise CheckpointError(f"{path}: {f} missing")
    try:
        cfg = ModelConfig.from_dict(json.loads((path / CONFIG).read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG}: {e}") from None
    try:
        tensors = load_file(path / WEIGHTS)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path / WEIGHTS}: unreadable safetensors ({str(e).splitlines()[0]})") from None
    tensors = {k: v.float() for k, v in tensors.items()}
    ortho = check_tensors(cfg, tensors)
    try:
        tok = Tokenizer.from_file(str(path / TOKENIZER))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise CheckpointError(f"{path / TOKENIZER}: unreadable tokenizer ({str(e).splitlines()[0]})") from None
    if tok.get_vocab_size() != cfg.vocab_size:
        raise CheckpointError(f"tokenizer has {tok.get_vocab_size()} tokens, config vocab_size={cfg.vocab_size}")
    model = Transformer.from_checkpoint_state(cfg, tensors)
    return Checkpoint(path, cfg, model, tok, ortho)


def atomic_dir(dest: Path, write) -> Path:
    """Build a folder in a temporary sibling, then rename it into place: never a partial artifact.

    An existing `dest` is replaced only once the new one is complete."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        write(tmp)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """The safetensors format, written one tensor at a time: safetensors.torch.save_file first serialises every
    tensor into one buffer, a second copy of the model in memory. Widest dtypes first keeps every offset aligned."""
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict = {"__metadata__": metadata} if metadata else {}
    off = 0
    for k, t in items:
        n = t.numel() * t.element_size()
        header[k] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for _, t in items:
            f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def save_checkpoint(dest, model: Transformer, tokenizer: Tokenizer, extra_files: dict[str, str] | None = None):
    def write(tmp: Path):
        (tmp / CONFIG).write_text(model.cfg.to_json())
        save_tensors(model.state_for_checkpoint(), tmp / WEIGHTS, {"format": "pt", "tying": model.cfg.tying})
        tokenizer.save(str(tmp / TOKENIZER))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    return atomic_dir(Path(dest), write)

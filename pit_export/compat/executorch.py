"""ExecuTorch's XNNPACK lowering and program writing with the weights in memory once: three private steps, swapped for
the duration of lean_lowering().

Left alone, lowering an fp32 SmolLM2-135M-shaped program peaks at 5.3x its checkpoint: ExecuTorch deep-copies every
partition's program, constants included, before XNNPACK preprocesses any of them; preprocess copies each constant into
a named-data blob (bytes), and the emitter copies each constant left outside the delegate (the gather's table) into
the program's constant buffer, both kept until the program is written. Inside lean_lowering:
- share_constants: the per-partition copy shares the constant tensors (preprocess only reads them; ExecuTorch's CUDA
  backend copies the same way in its low-memory mode);
- spill_named_data / spill_constant_buffer: each blob or constant of SPILL_BYTES or more waits in a file in spill_dir
  as FileBackedData, which ExecuTorch's serializer streams into the .pte / .ptd: only the constant being added is in
  memory.
The written program is the same, byte for byte (tests/test_compat.py). Each swap is checked and skipped on its own.
"""

from __future__ import annotations

import copy
import hashlib
import os
import tempfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .versions import Patch, Upstream, skip

WRITTEN_FOR = {"executorch": ("1.5.1", "1.6")}
# Named-data blobs and constants at least this large wait for serialization on disk rather than in memory.
SPILL_BYTES = 64 * 2**10

_DETAILS = "executorch.exir.backend.backend_details"
_STORE = "executorch.exir._serialize._named_data_store"
_CORD = "executorch.exir._serialize._cord"
_EMITTER = "executorch.exir.emit._emitter"
SHARE_CONSTANTS = Patch(
    "executorch: XNNPACK's per-partition program copy shares the constant tensors",
    WRITTEN_FOR,
    (
        # XnnpackBackend inherits it (a classmethod: no cls in the signature); ours is set on XnnpackBackend only
        Upstream(_DETAILS, "BackendDetails.copy_exported_program_for_preprocess", ("edge_program", "compile_specs")),
        Upstream("executorch.backends.xnnpack.xnnpack_preprocess", "XnnpackBackend"),
    ),
)
_FILE_BACKED = Upstream(_CORD, "FileBackedData.__init__", ("self", "path", "cleanup", "sha256"))
SPILL_NAMED_DATA = Patch(
    "executorch: XNNPACK's named-data blobs wait on disk",
    WRITTEN_FOR,
    (
        Upstream(
            _STORE,
            "NamedDataStore.add_named_data",
            ("self", "key", "data", "alignment", "external_tag", "tensor_layout"),
        ),
        _FILE_BACKED,
    ),
)
SPILL_CONSTANT_BUFFER = Patch(
    "executorch: the program's constant buffer waits on disk",
    WRITTEN_FOR,
    (
        Upstream(
            _EMITTER,
            "_Emitter._save_new_const_tensor",
            ("self", "spec", "buffer_data", "hashed", "allocation_info", "constant_tag"),
        ),
        _FILE_BACKED,
    ),
)
PATCHES = (SHARE_CONSTANTS, SPILL_NAMED_DATA, SPILL_CONSTANT_BUFFER)


@dataclass
class LeanReport:
    applied: list[str] = field(default_factory=list)  # names of the patches in effect
    spilled: int = 0  # blobs and constants sent to disk
    spilled_bytes: int = 0


@contextmanager
def lean_lowering(spill_dir: Path):
    """Lower to XNNPACK and write the program holding the weights once; yields a LeanReport. Patches outside their
    versions are skipped (CompatWarning) and that step runs ExecuTorch's own way."""
    report = LeanReport()
    with ExitStack() as stack:
        for patch, apply in (
            (SHARE_CONSTANTS, _share_constants),
            (SPILL_NAMED_DATA, _spill_named_data),
            (SPILL_CONSTANT_BUFFER, _spill_constant_buffer),
        ):
            if patch.applies() and stack.enter_context(apply(spill_dir, report)):
                report.applied.append(patch.name)
        yield report


def _import(patch: Patch, module: str, name: str):
    """An upstream class, or None after a CompatWarning when it is gone."""
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError) as e:
        skip(patch, f"{module}.{name} is gone ({e})")
        return None


@contextmanager
def _share_constants(spill_dir: Path, report: LeanReport):
    import torch

    xnnpack = _import(SHARE_CONSTANTS, "executorch.backends.xnnpack.xnnpack_preprocess", "XnnpackBackend")
    if xnnpack is None or not hasattr(xnnpack, "copy_exported_program_for_preprocess"):
        yield False
        return
    if "copy_exported_program_for_preprocess" in xnnpack.__dict__:  # ours is removed by del: it must be inherited
        skip(SHARE_CONSTANTS, "XnnpackBackend defines its own copy_exported_program_for_preprocess")
        yield False
        return

    def copy_sharing_constants(cls, program, compile_specs):
        tensors = (*program.state_dict.values(), *program.constants.values())
        return copy.deepcopy(program, {id(t): t for t in tensors if isinstance(t, torch.Tensor)})

    xnnpack.copy_exported_program_for_preprocess = classmethod(copy_sharing_constants)
    try:
        yield True
    finally:
        del xnnpack.copy_exported_program_for_preprocess


def _spiller(patch: Patch, spill_dir: Path, report: LeanReport):
    """spill(data, sha256=None): large bytes -> FileBackedData in spill_dir (copies share it); else data itself."""
    file_backed = _import(patch, _CORD, "FileBackedData")
    if file_backed is None:
        return None

    class Spilled(file_backed):
        def __deepcopy__(self, memo):  # immutable bytes on disk: copies of the program share them, as with bytes
            return self

    def spill(data, sha256: bytes | None = None):
        if not isinstance(data, bytes) or len(data) < SPILL_BYTES:
            return data
        fd, path = tempfile.mkstemp(suffix=".bin", dir=spill_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        report.spilled += 1
        report.spilled_bytes += len(data)
        return Spilled(path, cleanup=True, sha256=sha256 or hashlib.sha256(data).digest())

    return spill


@contextmanager
def _spill_named_data(spill_dir: Path, report: LeanReport):
    store = _import(SPILL_NAMED_DATA, _STORE, "NamedDataStore")
    spill = _spiller(SPILL_NAMED_DATA, spill_dir, report)
    if store is None or spill is None:
        yield False
        return
    add_named_data = store.add_named_data

    def add_spilled(self, key, data, *args, **kwargs):
        return add_named_data(self, key, spill(data), *args, **kwargs)

    store.add_named_data = add_spilled
    try:
        yield True
    finally:
        store.add_named_data = add_named_data


@contextmanager
def _spill_constant_buffer(spill_dir: Path, report: LeanReport):
    emitter = _import(SPILL_CONSTANT_BUFFER, _EMITTER, "_Emitter")
    spill = _spiller(SPILL_CONSTANT_BUFFER, spill_dir, report)
    if emitter is None or spill is None:
        yield False
        return
    save_const = emitter._save_new_const_tensor

    def save_spilled(self, spec, data, hashed, allocation_info=None, constant_tag=None):
        if allocation_info is None and constant_tag is None:  # the program's constant buffer (not mutable, not .ptd)
            data = spill(data, bytes.fromhex(hashed))  # the emitter's key is the data's sha256 already
        return save_const(self, spec, data, hashed, allocation_info, constant_tag)

    emitter._save_new_const_tensor = save_spilled
    try:
        yield True
    finally:
        emitter._save_new_const_tensor = save_const

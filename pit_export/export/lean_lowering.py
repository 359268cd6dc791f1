"""ExecuTorch's XNNPACK lowering with the weights in memory once: a few of its steps, swapped for the duration.

Left alone, lowering an fp32 SmolLM2-135M-shaped program peaks at 5.3x its checkpoint: the weights three times over,
plus a quadratic-in-nodes structure of the partitioners (torch.fx's and ExecuTorch's). Each swap below writes the same
program, byte for byte (tests/test_executorch.py); the pins in pyproject.toml fix the versions they
were made against."""

from __future__ import annotations

import copy
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

# Named-data blobs at least this large wait for serialization on disk rather than in memory (lean_lowering).
SPILL_BYTES = 64 * 2**10


@contextmanager
def lean_lowering(spill_dir: Path):
    """Lower to XNNPACK and emit the program holding the weights once, not three times.

    ExecuTorch, left alone, deep-copies every partition's program, constants included, before XNNPACK preprocesses
    any of them; preprocess copies each constant into a named-data blob (bytes), and the emitter copies each constant
    left outside the delegate (the gather's table) into the program's constant buffer, both kept until the program is
    written. For the duration of the lowering and the writing:
    - the per-partition copy shares the constant tensors (preprocess only reads them; ExecuTorch's CUDA backend
      copies the same way in its low-memory mode);
    - each large blob and constant buffer waits in a file in spill_dir as FileBackedData, which ExecuTorch's
      serializer streams into the .pte / .ptd: only the constant being added is in memory;
    - the partitioners' cycle checks read each node's transitive users (and inputs) from bitsets: torch and
      ExecuTorch keep them as Python sets, O(nodes^2) entries (~180 MiB each for a 30-layer forward graph, whatever
      the weights weigh).
    The written program is the same, byte for byte."""
    import torch.fx.passes.infra.partitioner as fx_partitioner
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
    from executorch.exir._serialize._cord import FileBackedData
    from executorch.exir._serialize._named_data_store import NamedDataStore
    from executorch.exir.backend.canonical_partitioners import group_partitioner
    from executorch.exir.emit._emitter import _Emitter

    class Spilled(FileBackedData):
        def __deepcopy__(self, memo):  # immutable bytes on disk: copies of the program share them, as with bytes
            return self

    def spill(data, sha256: bytes | None = None):
        if not isinstance(data, bytes) or len(data) < SPILL_BYTES:
            return data
        fd, path = tempfile.mkstemp(suffix=".bin", dir=spill_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return Spilled(path, cleanup=True, sha256=sha256 or hashlib.sha256(data).digest())

    def copy_sharing_constants(cls, program, compile_specs):
        tensors = (*program.state_dict.values(), *program.constants.values())
        return copy.deepcopy(program, {id(t): t for t in tensors if isinstance(t, torch.Tensor)})

    add_named_data, save_const = NamedDataStore.add_named_data, _Emitter._save_new_const_tensor

    def add_spilled(self, key, data, *args, **kwargs):
        return add_named_data(self, key, spill(data), *args, **kwargs)

    def save_spilled(self, spec, data, hashed, allocation_info=None, constant_tag=None):
        if allocation_info is None and constant_tag is None:  # the program's constant buffer (not mutable, not .ptd)
            data = spill(data, bytes.fromhex(hashed))  # the emitter's key is the data's sha256 already
        return save_const(self, spec, data, hashed, allocation_info, constant_tag)

    assert "copy_exported_program_for_preprocess" not in XnnpackBackend.__dict__  # inherited: restored by del
    XnnpackBackend.copy_exported_program_for_preprocess = classmethod(copy_sharing_constants)
    NamedDataStore.add_named_data, _Emitter._save_new_const_tensor = add_spilled, save_spilled
    viewers = fx_partitioner._DependencyViewer, group_partitioner._DependencyViewer
    fx_partitioner._DependencyViewer = group_partitioner._DependencyViewer = BitsetDependencyViewer
    try:
        yield
    finally:
        NamedDataStore.add_named_data, _Emitter._save_new_const_tensor = add_named_data, save_const
        del XnnpackBackend.copy_exported_program_for_preprocess
        fx_partitioner._DependencyViewer, group_partitioner._DependencyViewer = viewers


class BitsetDependencyViewer:
    """The partitioners' _DependencyViewer (torch.fx's and ExecuTorch's group partitioner's): every node's transitive
    users and inputs, for the cycle check when merging partitions, each kept as the bits of one int over graph order
    rather than a set of nodes (N^2 / 8 bytes instead of ~70 N^2); iterated lazily, so a check can stop early."""

    def __init__(self, graph_module) -> None:
        self.nodes = list(graph_module.graph.nodes)
        index = {n: i for i, n in enumerate(self.nodes)}
        self.downstreams: dict = {}
        self.upstreams: dict = {}
        for node in reversed(self.nodes):
            bits = 0
            for user in node.users:
                bits |= 1 << index[user] | self.downstreams.get(user, 0)
            self.downstreams[node] = bits
        for node in self.nodes:
            bits = 0
            for source in node.all_input_nodes:
                bits |= 1 << index[source] | self.upstreams.get(source, 0)
            self.upstreams[node] = bits

    def downstreams_of(self, node):
        return self._members(self.downstreams.get(node, 0))

    def upstreams_of(self, node):
        return self._members(self.upstreams.get(node, 0))

    def _members(self, bits: int):
        while bits:
            low = bits & -bits
            yield self.nodes[low.bit_length() - 1]
            bits ^= low

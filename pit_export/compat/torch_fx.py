"""torch.fx's partitioner dependency viewer on bitsets (private: torch.fx.passes.infra.partitioner._DependencyViewer).

CapabilityBasedPartitioner builds a _DependencyViewer: every node's transitive users as a Python set, O(nodes^2)
entries (~180 MiB for a 30-layer forward graph, whatever the weights weigh). ExecuTorch's GroupBasedPartitioner (what
XNNPACK partitions with) calls that constructor, then replaces the result by its own viewer, so at 135M parameters
both sets stood at once. On bitsets over graph order torch's takes N^2 / 8 bytes.

ExecuTorch's own viewer (executorch.exir.backend.canonical_partitioners.group_partitioner._DependencyViewer) stays on
its sets: on bitsets it cost +49 % export time (400 s against 269 s at 135M) for a peak inside the run-to-run spread.
"""

from __future__ import annotations

from contextlib import contextmanager

from .versions import Patch, Upstream, skip

WRITTEN_FOR = {"torch": ("2.13", "2.14")}
BITSET_VIEWER = Patch(
    "torch.fx partitioner dependency viewer on bitsets",
    WRITTEN_FOR,
    (
        Upstream("torch.fx.passes.infra.partitioner", "_DependencyViewer.__init__", ("self", "graph_module")),
        Upstream("torch.fx.passes.infra.partitioner", "_DependencyViewer.downstreams_of", ("self", "node")),
    ),
)
PATCHES = (BITSET_VIEWER,)


class BitsetDependencyViewer:
    """torch.fx's _DependencyViewer with each node's transitive users kept as the bits of one int over graph order
    (N^2 / 8 bytes instead of ~70 N^2); downstreams_of iterates them lazily, in graph order, so a check can stop
    early. CapabilityBasedPartitioner only iterates the result (tests/test_compat.py checks it asks nothing else)."""

    def __init__(self, graph_module) -> None:
        self.nodes = list(graph_module.graph.nodes)
        index = {n: i for i, n in enumerate(self.nodes)}
        self.downstreams: dict = {}
        for node in reversed(self.nodes):
            bits = 0
            for user in node.users:
                bits |= 1 << index[user] | self.downstreams.get(user, 0)
            self.downstreams[node] = bits

    def downstreams_of(self, node):
        bits = self.downstreams.get(node, 0)
        while bits:
            low = bits & -bits
            yield self.nodes[low.bit_length() - 1]
            bits ^= low


@contextmanager
def bitset_dependency_viewer():
    """torch.fx's partitioners use BitsetDependencyViewer for the duration; yields whether the swap applied."""
    if not BITSET_VIEWER.applies():
        yield False
        return
    import torch.fx.passes.infra.partitioner as fx_partitioner

    upstream = getattr(fx_partitioner, "_DependencyViewer", None)
    if upstream is None:
        skip(BITSET_VIEWER, "torch.fx.passes.infra.partitioner._DependencyViewer is gone")
        yield False
        return
    fx_partitioner._DependencyViewer = BitsetDependencyViewer
    try:
        yield True
    finally:
        fx_partitioner._DependencyViewer = upstream

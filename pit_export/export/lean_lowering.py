"""ExecuTorch's XNNPACK lowering with the weights in memory once, for models large enough to need it.

The patches themselves live in pit_export.compat (executorch.py: shared constants in the per-partition copies,
blobs and constants waiting on disk; torch_fx.py: torch.fx's partitioner viewer on bitsets), each guarded by the
toolchain versions it was written for. This module decides when they run: above LEAN_ABOVE_BYTES of folded weights.

Below it the plain lowering's extra weight copies (two to three, a few tens of MB for pit-tiny) are small beside the
0.36 GiB the libraries take, and ExecuTorch's own path runs. At 256 MiB of weights the copies alone (0.5-0.75 GiB)
pass the 3x-checkpoint budget together with the libraries; at 135M parameters (513 MiB) the plain lowering peaked at
5.3x the checkpoint and the lean one at 2.9x (README, "At SmolLM2-135M scale").
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from pit_export.compat import executorch as compat_executorch
from pit_export.compat import torch_fx
from pit_export.compat.executorch import SPILL_BYTES, LeanReport
from pit_export.memory import FORK_ABOVE_BYTES

# Folded weights above this lower inside lean_lowering (the threshold above which the other exporters fork, 256 MiB).
LEAN_ABOVE_BYTES = FORK_ABOVE_BYTES

__all__ = ["LEAN_ABOVE_BYTES", "SPILL_BYTES", "LeanReport", "lean_lowering", "wants_lean"]


def wants_lean(nbytes: int) -> bool:
    return nbytes > LEAN_ABOVE_BYTES


@contextmanager
def lean_lowering(spill_dir: Path):
    """Lower to XNNPACK and write the program holding the weights once; yields a LeanReport (report.applied names
    the patches in effect, torch.fx's viewer included). The written program is the same, byte for byte."""
    with compat_executorch.lean_lowering(spill_dir) as report, torch_fx.bitset_dependency_viewer() as viewer:
        if viewer:
            report.applied.append(torch_fx.BITSET_VIEWER.name)
        yield report

"""Every use of a private toolchain API, in one place: one module per toolchain, each patch guarded by the versions it
was written for.

    executorch.py   ExecuTorch's XNNPACK lowering with the weights in memory once (lean_lowering)
    torch_fx.py     torch.fx's partitioner dependency viewer on bitsets
    onnxscript.py   forget the graph onnxscript's rewrite rules keep after matching
    coremltools.py  import coremltools without its optional probes; its blob storage (weight.bin) reader and writer;
                    the CoreML interface pieces the exporter and the sessions share (a leaf module both import)
    versions.py     the guard: Patch, Upstream, the installed-version check

A patch declares `written_for`: {distribution: (lowest, first excluded)}, i.e. >= lowest and < first excluded, on
release numbers (2.13.0+cpu counts as 2.13.0, 1.6.0rc1 as 1.6.0). `Patch.applies()` (versions.py) checks it when the
patch is about to be used: outside the range (or when a symbol it needs is gone) it warns (CompatWarning) and the
caller takes the toolchain's own, unpatched path: heavier or slower, never wrong and never a crash. Each patch also
lists the upstream symbols it touches and their parameters (`Upstream`); tests/test_compat.py checks them against the
installed toolchain, and checks the patched ExecuTorch lowering writes upstream's bytes. To widen a range, run that
file against the new version.

Importing the package or a module of it imports no toolchain (compat.coremltools imports numpy): runtimes and
exporters may both import it, and a toolchain is imported only when its patch is used.
"""

from __future__ import annotations

from .versions import CompatWarning, Patch, Upstream, installed_version, release, skip, version_in

__all__ = ["CompatWarning", "Patch", "Upstream", "all_patches", "installed_version", "release", "skip", "version_in"]


def all_patches() -> list[Patch]:
    """Every patch of every compat module (imports them; their toolchains are imported only when a patch is used)."""
    from . import coremltools, executorch, onnxscript, torch_fx

    return [p for m in (executorch, torch_fx, onnxscript, coremltools) for p in m.PATCHES]

"""pit_export.compat: every private toolchain API the package uses, each patch guarded by the versions it was written
for. Checked here: the upstream symbols each patch touches still have the parameters it was written against; the
lean ExecuTorch lowering writes ExecuTorch's own bytes (both layouts, fp32 and 8da4w); outside its versions a patch is
skipped with a warning and upstream's path runs; the package has no import cycles."""

import ast
import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch

from pit_export import compat
from pit_export.compat import coremltools as compat_coremltools
from pit_export.compat import executorch as compat_executorch
from pit_export.compat import onnxscript as compat_onnxscript
from pit_export.compat import torch_fx as compat_torch_fx
from pit_export.compat import versions
from pit_export.fold import fold

from .conftest import ROOT

UPSTREAM = [(p, u) for p in compat.all_patches() for u in p.upstream]


def _param_names(obj) -> tuple[str, ...]:
    """Parameter names by inspect.signature; for pybind11 callables (no signature), from the docstring's first line
    `name(self: T, arg0: int) -> R`."""
    try:
        return tuple(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        pass
    head = (obj.__doc__ or "").strip().splitlines()[0]
    m = re.match(r"\w+\((.*)\)\s*(->.*)?$", head)
    assert m, f"no signature for {obj!r}: {head!r}"
    names, depth, start, args = [], 0, 0, m.group(1)
    for i, ch in enumerate(args + ","):
        depth += ch in "[(" and 1 or ch in "])" and -1 or 0
        if ch == "," and depth == 0:
            names.append(args[start:i].split(":")[0].split("=")[0].strip())
            start = i + 1
    return tuple(n for n in names if n)


# ---------------------------------------------------------------- (a) upstream symbols as the patches knew them


@pytest.mark.parametrize("patch, up", UPSTREAM, ids=[f"{u.module.split('.')[0]}:{u.name}" for _, u in UPSTREAM])
def test_upstream_symbol_unchanged(patch, up):
    """Each symbol a patch replaces, wraps or reads exists, and the callables take the parameters it was written
    against: a toolchain update that renames or reshapes one fails here, not in an export."""
    if up.module.startswith("coremltools"):
        compat_coremltools.import_coremltools()  # not the plain import: it would load every probed package
    obj = up.resolve()
    if up.params is not None:
        assert callable(obj), f"{up.module}.{up.name} is not callable"
        assert _param_names(obj) == up.params, f"{up.module}.{up.name}: {patch.name}"


def test_installed_toolchain_is_inside_every_range():
    """The pinned toolchain is what the patches were written for: a pin moved without re-checking them fails here
    (in an export they would be skipped with a CompatWarning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", compat.CompatWarning)
        assert all(p.applies() for p in compat.all_patches())


def test_patched_call_sites_as_written_against():
    """What the patches assume beyond signatures: XnnpackBackend inherits the per-partition copy (the patch is
    removed by del); CapabilityBasedPartitioner only iterates downstreams_of; SimplePatternMatcher.match() sets the
    state forget_matched_graphs clears; coremltools probes the modules import_coremltools hides."""
    compat_coremltools.import_coremltools()
    import coremltools._deps as deps
    import onnxscript.rewriter._matcher as matcher
    import torch.fx.passes.infra.partitioner as fx_partitioner
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    assert "copy_exported_program_for_preprocess" not in XnnpackBackend.__dict__
    assert set(re.findall(r"dependency_viewer\.(\w+)", inspect.getsource(fx_partitioner))) == {"downstreams_of"}
    source = inspect.getsource(matcher.SimplePatternMatcher)
    assert all(f"self.{a} =" in source or f"self.{a}:" in source for a in compat_onnxscript.MATCH_STATE)
    source = inspect.getsource(deps)
    assert all(f"import {m}" in source for m in compat_coremltools._PROBED_ONLY)


def test_bitset_viewer_is_torch_viewer():
    """BitsetDependencyViewer lists the same transitive users as torch.fx's _DependencyViewer, node by node, and the
    partitioner proposes the same partitions with it."""
    from torch.fx import symbolic_trace
    from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner, _DependencyViewer
    from torch.fx.passes.operator_support import OperatorSupportBase

    class Branchy(torch.nn.Module):
        def forward(self, x, y):
            a = torch.relu(x) + y
            b = torch.sigmoid(a) * torch.tanh(x)
            c = torch.relu(b) - a
            return torch.sigmoid(c) + torch.neg(b), torch.tanh(y)

    gm = symbolic_trace(Branchy())
    ours, theirs = compat_torch_fx.BitsetDependencyViewer(gm), _DependencyViewer(gm)
    for n in gm.graph.nodes:
        listed = list(ours.downstreams_of(n))
        assert len(listed) == len(set(listed)) and set(listed) == theirs.downstreams_of(n), n

    class NotSigmoid(OperatorSupportBase):  # sigmoid splits the graph: merges must check for cycles
        def is_node_supported(self, submodules, node):
            return node.op == "call_function" and node.target is not torch.sigmoid

    def partitions():
        found = CapabilityBasedPartitioner(gm, NotSigmoid(), allows_single_node_partition=True).propose_partitions()
        return sorted(sorted(n.name for n in p.nodes) for p in found)

    plain = partitions()
    with compat_torch_fx.bitset_dependency_viewer() as on:
        assert on
        assert partitions() == plain
    assert len(plain) > 1


# ---------------------------------------------------------------- (b) lean lowering = ExecuTorch's own bytes


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _all_lean_patches() -> list[str]:
    return [p.name for p in compat_executorch.PATCHES] + [compat_torch_fx.BITSET_VIEWER.name]


def test_lean_export_writes_upstream_bytes_shared_z_fp32(et_fp32_dir, pit_ckpt, tmp_path, monkeypatch):
    """shared-z fp32 (model.pte + model.ptd): the export forced through lean_lowering (threshold 0) writes the same
    files, byte for byte, as the shared fixture, which pit-tiny exports ExecuTorch's own way (below the threshold);
    no spill folder is left in the artifact."""
    import json

    from pit_export.models.checkpoint import MARKER

    from pit_export.export import executorch as et_export
    from pit_export.export import export_artifact

    plain = json.loads((et_fp32_dir / "pit_export.json").read_text())["executorch"]
    assert plain["lean_lowering"] == []  # the fixture ran upstream's path
    monkeypatch.setattr("pit_export.export.lean_lowering.LEAN_ABOVE_BYTES", 0)
    spilled = []
    real = et_export.lower_and_write
    monkeypatch.setattr(et_export, "lower_and_write", lambda *a: spilled.append(real(*a)) or spilled[-1])
    out = tmp_path / "lean"
    meta = export_artifact(pit_ckpt, "android", out, scheme="fp32", layout="shared-z")
    assert meta["executorch"]["lean_lowering"] == _all_lean_patches()
    assert spilled[0].spilled >= 5 * pit_ckpt.config.n_layers  # wq, wo and the MLP weights of every layer at least
    for name in ("model.pte", "model.ptd"):
        assert (out / name).read_bytes() == (et_fp32_dir / name).read_bytes(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != MARKER]


def test_lean_lowering_writes_upstream_bytes_untied_8da4w(pit_ckpt, tmp_path):
    """untied 8da4w, one model.pte: the probe methods (embed: the fp32 gather table in the program's constant buffer;
    unembed: the 8da4w head, XNNPACK's packed 4-bit blob) lowered both ways give the same bytes. The forward method
    (29 s to lower here) holds the same kinds of weights; the full program is compared in the shared-z test above.
    Lowering consumes its programs, a deep copy of them included: each lowering gets its own export."""
    from pit_export.export.executorch import EtDecoder, export_programs, lower_and_write, metadata, quantize
    from pit_export.quantize import get_scheme

    fw = fold(pit_ckpt, "untied")[0]
    dec = EtDecoder(fw)
    quantize(dec, get_scheme("8da4w"))

    def probes() -> dict:
        return {k: v for k, v in export_programs(dec).items() if k in ("embed", "unembed")}

    outs = {mode: tmp_path / mode for mode in ("plain", "lean")}
    for d in outs.values():
        d.mkdir()
    report = lower_and_write(probes(), metadata(fw.cfg), False, outs["lean"], lean=True)
    assert report.applied == _all_lean_patches()
    assert report.spilled >= 2  # the gather table and the head's blob at least
    assert lower_and_write(probes(), metadata(fw.cfg), False, outs["plain"], lean=False).applied == []
    assert list(_files(outs["lean"])) == ["model.pte"]
    assert _files(outs["lean"]) == _files(outs["plain"])
    assert not [p for p in outs["lean"].iterdir() if p.name.startswith(".lowering-")]


def test_lean_lowering_only_for_large_models(pit_ckpt):
    from pit_export.export.lean_lowering import LEAN_ABOVE_BYTES, wants_lean
    from pit_export.memory import FORK_ABOVE_BYTES

    assert LEAN_ABOVE_BYTES == FORK_ABOVE_BYTES == 256 * 2**20
    assert not wants_lean(fold(pit_ckpt, "untied")[0].nbytes)  # pit-tiny: ExecuTorch's own lowering
    assert wants_lean(513 * 2**20)  # SmolLM2-135M in fp32


# ---------------------------------------------------------------- (c) outside its versions: skipped, upstream runs


@pytest.fixture
def future_toolchain(monkeypatch):
    monkeypatch.setattr(versions, "installed_version", lambda dist: "99.0.0")


@pytest.mark.parametrize("patch", compat.all_patches(), ids=lambda p: re.sub(r"\W+", "-", p.name)[:48])
def test_every_patch_checks_its_versions(patch, future_toolchain):
    with pytest.warns(compat.CompatWarning, match="99.0.0"):
        assert not patch.applies()


def test_version_ranges():
    assert compat.version_in("2.13.0+cpu", "2.13", "2.14")
    assert compat.version_in("1.5.1", "1.5.1", "1.6") and compat.version_in("1.5.9", "1.5.1", "1.6")
    assert not compat.version_in("1.5.0", "1.5.1", "1.6")
    assert not compat.version_in("1.6.0rc1", "1.5.1", "1.6")  # pre-releases of the next version count as it
    assert not compat.version_in("2.14.0.dev20260101", "2.13", "2.14")
    assert not compat.version_in("unknown", "0", "99")


def test_missing_toolchain_is_outside_the_range(monkeypatch):
    monkeypatch.setattr(versions, "installed_version", lambda dist: None)
    with pytest.warns(compat.CompatWarning, match="found none"):
        assert not compat_torch_fx.BITSET_VIEWER.applies()


def test_lean_lowering_outside_its_versions_runs_upstream(future_toolchain, tmp_path):
    """Every ExecuTorch and torch.fx swap is skipped with a warning: inside the context the upstream classes and
    methods are ExecuTorch's and torch's own."""
    import torch.fx.passes.infra.partitioner as fx_partitioner
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
    from executorch.exir._serialize._named_data_store import NamedDataStore
    from executorch.exir.emit._emitter import _Emitter

    from pit_export.export.lean_lowering import lean_lowering

    before = (NamedDataStore.add_named_data, _Emitter._save_new_const_tensor, fx_partitioner._DependencyViewer)
    with pytest.warns(compat.CompatWarning) as caught, lean_lowering(tmp_path) as report:
        assert report.applied == []
        assert "copy_exported_program_for_preprocess" not in XnnpackBackend.__dict__
        assert (NamedDataStore.add_named_data, _Emitter._save_new_const_tensor, fx_partitioner._DependencyViewer) == (
            before
        )
    assert sum(issubclass(w.category, compat.CompatWarning) for w in caught) == 4


def test_lean_lowering_restores_upstream(tmp_path):
    import torch.fx.passes.infra.partitioner as fx_partitioner
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
    from executorch.exir._serialize._named_data_store import NamedDataStore
    from executorch.exir.emit._emitter import _Emitter

    from pit_export.export.lean_lowering import lean_lowering

    before = (NamedDataStore.add_named_data, _Emitter._save_new_const_tensor, fx_partitioner._DependencyViewer)
    with pytest.raises(RuntimeError, match="boom"), lean_lowering(tmp_path) as report:
        assert len(report.applied) == 4 and fx_partitioner._DependencyViewer is not before[2]
        raise RuntimeError("boom")
    assert "copy_exported_program_for_preprocess" not in XnnpackBackend.__dict__
    assert (NamedDataStore.add_named_data, _Emitter._save_new_const_tensor, fx_partitioner._DependencyViewer) == before


def test_onnxscript_and_coremltools_patches_outside_their_versions(future_toolchain):
    """forget_matched_graphs leaves the matchers alone; merge_functions gets no blob storage and falls back to
    ct.utils.save_multifunction."""
    with pytest.warns(compat.CompatWarning, match="onnxscript"):
        assert compat_onnxscript.forget_matched_graphs() == 0
    with pytest.warns(compat.CompatWarning, match="coremltools"):
        assert compat_coremltools.blob_storage() is None


def test_import_coremltools_skips_probed_packages():
    """In a fresh process: coremltools imports without the packages it only probes for, and they stay importable."""
    import subprocess
    import sys

    code = (
        "import sys, warnings; from pit_export.compat import CompatWarning; "
        "warnings.simplefilter('error', CompatWarning); "
        "from pit_export.compat.coremltools import import_coremltools, _PROBED_ONLY; "
        "ct = import_coremltools(); assert ct.__name__ == 'coremltools'; "
        "loaded = [m for m in _PROBED_ONLY if m in sys.modules]; assert not loaded, loaded; "
        "import scipy"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------- the package's module graph


def _module_graph() -> dict[str, set[str]]:
    """pit_export's modules (models/ and runtimes/ as installed: pit_export.models, pit_export.runtimes) -> the package
    modules each imports anywhere in its body, function-level imports included."""
    roots = {
        "pit_export": ROOT / "pit_export",
        "pit_export.models": ROOT / "models",
        "pit_export.runtimes": ROOT / "runtimes",
    }
    aliases = {"runtimes": "pit_export.runtimes", "models": "pit_export.models"}  # remote_runner's top-level view
    files = {}
    for pkg, folder in roots.items():
        for f in folder.rglob("*.py"):
            parts = f.relative_to(folder).with_suffix("").parts
            name = ".".join((pkg, *parts)).removesuffix(".__init__")
            files[name] = f

    def canon(name: str) -> str:
        head, _, rest = name.partition(".")
        return f"{aliases[head]}.{rest}".rstrip(".") if head in aliases else name

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, f in files.items():
        edges = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [canon(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")[: len(mod.split(".")) - node.level + (f.name == "__init__.py")]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = canon(node.module)
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in files else src for a in node.names]
            else:
                continue
            edges.update(t for t in map(known, targets) if t is not None and t != mod)
        graph[mod] = edges
    return graph


def test_no_import_cycles_in_the_package():
    """No module of the package imports, directly or through others and from any function, a module that imports it
    back; exporters do not import runtimes (what they share with them lives in pit_export.compat)."""
    graph = _module_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while comp[-1:] != [v]:
                comp.append(stack.pop())
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles
    assert "pit_export.compat.coremltools" in graph["pit_export.runtimes.milnumpy"]
    exporters = [m for m in graph if m.startswith("pit_export.export.")]
    assert not [(m, t) for m in exporters for t in graph[m] if t.startswith("pit_export.runtimes")]


def test_cli_shows_a_skipped_patch_as_one_warning_line(capsys):
    """The CLI silences toolchain chatter, but not a compat patch skipped for its versions: one `warning:` line."""
    import warnings

    from pit_export.compat.versions import CompatWarning
    from pit_export.quiet import quiet_toolchains

    with warnings.catch_warnings():
        quiet_toolchains()
        warnings.warn("toolchain chatter", DeprecationWarning, stacklevel=1)
        warnings.warn("pit_export.compat: a patch: written for x >=1,<2, found 3; skipped", CompatWarning, stacklevel=1)
        err = capsys.readouterr().err
    assert err.splitlines() == ["warning: pit_export.compat: a patch: written for x >=1,<2, found 3; skipped"]

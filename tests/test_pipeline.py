"""`pit-export export`: the one-command pipeline, its report and its gates (through the CLI, as users run it)."""

import json
import shutil

import jsonschema
import onnx
import pytest
from matplotlib import image
from onnx import numpy_helper

from pit_export.report import PLOTS, REPORT_SCHEMA
from pit_export.validate import GATES

from .conftest import DEFAULT_MODEL, TIED_MODEL
from .test_cli import run

FAST = ("--n-windows", "2", "--n-greedy", "16")


@pytest.fixture(scope="module")
def onnx_run(tmp_path_factory):
    """The onnx-cpu preset with a gate file so strict on the 4-bit schemes that the pipeline must fall back twice
    (8da4w, int4, then int8), plus the tied baseline exported with the same presets."""
    root = tmp_path_factory.mktemp("pipeline")
    gates = root / "gates.json"
    gates.write_text(json.dumps({s: {"top1": [">=", 1.0]} for s in ("8da4w", "int4")}))
    out = root / "out"
    p = run("export", DEFAULT_MODEL, "--target", "onnx-cpu", "--out", out, "--gates", gates,
            "--baseline", TIED_MODEL, *FAST, "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr
    return out, json.loads(p.stdout)


def test_report_schema_and_fallback(onnx_run):
    out, printed = onnx_run
    rep = json.loads((out / "report.json").read_text())
    jsonschema.validate(rep, REPORT_SCHEMA)
    assert printed == rep and rep["passed"]
    (a,) = rep["artifacts"]
    # 4-bit weights cannot keep every top-1 token (84 % measured); int8 met its default gate
    assert a["scheme"] == "int8" and a["status"] == "passed" and "fell back to int8" in a["note"]
    assert [r["scheme"] for r in a["rejected"]] == ["8da4w", "int4"]
    assert all(r["failures"][0]["metric"] == "top1" for r in a["rejected"])
    assert a["metrics"]["ppl_ratio"] <= GATES["int8"]["ppl_ratio"][1]
    (b,) = rep["baseline"]
    assert b["status"] == "passed" and b["layout"] == "shared-e" and b["scheme"] == "int8"
    md = (out / "report.md").read_text()
    assert "PIT vs tied baseline" in md and "fell back to int8" in md


def test_manifest_hashes_match_files(onnx_run):
    out, _ = onnx_run
    man = json.loads((out / "manifest.json").read_text())
    assert (
        man["checkpoint"]["files"]["model.safetensors"]["bytes"] == (DEFAULT_MODEL / "model.safetensors").stat().st_size
    )
    assert man["tools"]["torch"].startswith("2.13.0")
    for art in man["artifacts"] + man["baseline"]:
        folder = out / art["folder"]
        assert art["deploy_files"] == ["model.onnx", "model.onnx.data"]
        assert art["bytes"] == sum(art["files"][f]["bytes"] for f in art["deploy_files"]) > 0
        for name, f in art["files"].items():
            assert (folder / name).stat().st_size == f["bytes"]
        assert all(g["passed"] for g in art["gates"])
    for f in ("model.onnx", "model.onnx.data", "model.ort", "embed.onnx", "unembed.onnx", "genai_config.json"):
        assert (out / "onnx-cpu" / f).is_file(), f


def test_plots_are_real_images(onnx_run):
    out, _ = onnx_run
    for rel in PLOTS.values():
        img = image.imread(out / rel)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img.std() > 0.01, rel  # not a blank canvas


def test_report_matches_validate(onnx_run):
    """The report's numbers are the ones `pit-export validate` prints for the same artifact."""
    out, rep = onnx_run
    p = run("validate", DEFAULT_MODEL, "--artifact", out / "onnx-cpu", *FAST, "--json")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)["results"][0]["metrics"]
    want = rep["artifacts"][0]["metrics"]
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k


def test_damaged_artifact_fails_gate_exit_3(onnx_run, tmp_path):
    """One weight perturbed (a norm gain, x50) in a copy of the passing artifact: its gate fails with exit 3."""
    out, _ = onnx_run
    bad = tmp_path / "damaged"
    shutil.copytree(out / "onnx-cpu", bad)
    model = onnx.load(bad / "model.onnx")
    init = next(i for i in model.graph.initializer if "norm" in i.name and len(i.dims) == 1)
    w = numpy_helper.to_array(init).copy()
    w[3] *= 50
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save_model(model, bad / "model.onnx", save_as_external_data=True, location="model.onnx.data")
    p = run("validate", DEFAULT_MODEL, "--artifact", bad, *FAST)
    assert p.returncode == 3, p.stderr
    assert "gate failed" in p.stderr and "ppl_ratio" in p.stderr and "Traceback" not in p.stderr


def test_fallbacks_fold_once_and_export_what_a_fresh_fold_exports(tmp_path, pit_ckpt, monkeypatch):
    """A preset whose schemes fail their gates falls back with the run's one fold (and one reference recording); the
    artifact it ships is byte for byte what a fresh fold exports with that scheme."""
    import pit_export.fold as fold_module
    import pit_export.pipeline as pipeline
    from pit_export.export import export_artifact
    from pit_export.report import NONDETERMINISM

    folds = []
    real = fold_module.fold

    def counted(ckpt, layout):
        folds.append(layout)
        return real(ckpt, layout)

    monkeypatch.setattr(pipeline, "fold", counted)
    monkeypatch.setattr("pit_export.export.fold", counted)
    gates = {s: {"top1": (">=", 1.0)} for s in ("8da4w", "int4")}  # 4-bit cannot keep every top-1: two fallbacks
    opts = pipeline.PipelineOptions(gates={**default_gates(), **gates}, n_windows=2, n_greedy=16)
    result = pipeline.run(pit_ckpt, ["onnx-cpu"], tmp_path / "out", opts)
    (a,) = result.artifacts
    assert a.status == "passed" and a.scheme == "int8" and len(a.rejected) == 2, (a.status, a.scheme, a.rejected)
    assert folds == ["shared-z"]  # three attempts, one fold
    fresh = export_artifact(pit_ckpt, "onnx-cpu", tmp_path / "fresh", "int8")
    assert [f for f in fresh["files"] if f not in NONDETERMINISM and fresh["files"][f] != a.files[f]] == []


def default_gates():
    from pit_export.validate import GATES

    return {k: dict(v) for k, v in GATES.items()}

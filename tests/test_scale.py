"""The SmolLM2-135M-shaped run (benchmarks/scale.py) as a test: import -> fold -> export (android, onnx-cpu, ios;
fp32) -> validate with the fp32 gates passing on every backend. Slow (tens of minutes on 2 cores)."""

import json

import pytest

from benchmarks.scale import main as scale_main


@pytest.mark.slow
def test_smollm2_135m_shape_end_to_end(tmp_path):
    out = tmp_path / "scale.json"
    rc = scale_main(["--work", str(tmp_path / "work"), "--out", str(out)])
    rep = json.loads(out.read_text())
    assert rc == 0, rep["stages"]
    assert set(rep["parity"]) == {"android", "onnx-cpu", "ios"} and all(p["passed"] for p in rep["parity"].values())
    # every stage but the ExecuTorch export stays within 3x; that one holds XNNPACK's copies of the weights beside
    # the torch ones (README, "At SmolLM2-135M scale") and is recorded, not gated
    gated = ["import-hf", "fold shared-z", "export onnx-cpu", "export ios"]
    gated += [f"validate {t}" for t in ("android", "onnx-cpu", "ios")]
    assert all(rep["within_budget"][s] for s in gated), rep["stages"]

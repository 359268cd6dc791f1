"""The SmolLM2-135M-shaped run (benchmarks/scale.py) as a test: import -> fold -> export (android, onnx-cpu, ios;
fp32) -> validate, with the fp32 gates passing on every backend and every stage within 3x the checkpoint's size.
Slow (tens of minutes on 2 cores)."""

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
    assert all(rep["within_budget"].values()), rep["stages"]  # every stage within 3x the fp32 checkpoint

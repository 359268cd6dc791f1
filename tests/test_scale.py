"""The SmolLM2-135M-shaped run (benchmarks/scale.py) as a test: import -> fold -> export (android, onnx-cpu, ios;
fp32) -> validate, with the fp32 gates passing on every backend and every stage within 3x the checkpoint's size.
Slow (tens of minutes on 2 cores).

scale.py runs in its own process, as the benchmark does: a stage's peak is its ru_maxrss, and Linux keeps the
pre-exec resident set of a forked child in that number (exec records the old mm's high-water mark), so stages
spawned from this test process, grown by the tests before it, would all report at least its size."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smollm2_135m_shape_end_to_end(tmp_path):
    out = tmp_path / "scale.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert proc.returncode == 0, rep["stages"]
    assert set(rep["parity"]) == {"android", "onnx-cpu", "ios"} and all(p["passed"] for p in rep["parity"].values())
    assert all(rep["within_budget"].values()), rep["stages"]  # every stage within 3x the fp32 checkpoint

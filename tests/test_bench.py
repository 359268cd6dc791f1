"""pit-export bench: the JSON it writes, its exit codes, the bytes-per-token accounting, the emulated ARM64 path.
No assertions on how fast anything runs: timings are measurements (benchmarks/results), not test outcomes; only
relations that hold at any speed (the traced kernels of a step run inside that step's wall time)."""

import dataclasses
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from pit_export import bench, emu
from pit_export.errors import EXIT_BAD_INPUT, EXIT_UNAVAILABLE
from pit_export.roofline import PHONES, TokenBytes, projection, token_bytes, weight_split

from .test_faults import cli

SMALL = ["--threads", "1", "--prompt-len", "8", "--gen", "4", "--repeats", "1"]


@pytest.fixture(scope="module")
def onnx_untied(pit_ckpt, tmp_path_factory):
    """fp32, untied: the embedding table is only gathered, the head streamed; the parity gate applies."""
    from pit_export.export import export_artifact

    out = tmp_path_factory.mktemp("bench") / "onnx-untied"
    export_artifact(pit_ckpt, "onnx-cpu", out, scheme="fp32", layout="untied")
    return out


@pytest.fixture(scope="module")
def host_result(onnx_untied, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-json") / "r.json"
    data = bench.bench(onnx_untied, "host", bench.BenchConfig((1,), (8,), 4, 1))
    bench.write_json(data, out)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def kv_per_position(onnx_untied):
    """KV cache bytes per position, measured: the present K/V arrays the ONNX decoder returns after a prefill (not
    roofline.kv_bytes's formula). The .pte of the same model caches the same fp32 K and V per layer."""
    from pit_export.runtimes import open_session
    from pit_export.runtimes.timing import prompt_tokens

    sess = open_session(onnx_untied, threads=1)
    try:
        sess.prefill(prompt_tokens(16, sess.vocab_size), 0)
        inner = sess.inner
        if inner.shared_buffer:  # the fused graph: one K/V buffer per layer, [1, H_kv, capacity, hd] fp32
            per_position = sum(4 * math.prod(b.shape()) // b.shape()[2] for b in inner.buffers)
            assert per_position > 0 and all(b.shape()[2] >= 16 for b in inner.buffers)
            return per_position
        total = sum(p.nbytes for p in inner.past)
    finally:
        sess.close()
    assert total % 16 == 0 and total > 0
    return total // 16


@pytest.fixture(scope="module")
def ort_ops(onnx_untied):
    """The op types of the graph ONNX Runtime executes for model.onnx (after its fusions: FusedMatMul, QuickGelu,
    ...), from the optimized model it writes out: an inventory of what a decode step runs, independent of the trace."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.log_severity_level = 1, 3
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(onnx_untied / "model.onnx"), so, providers=["CPUExecutionProvider"])
        return {n.op_type for n in onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node}


def _no_table_bytes(folder: Path, cfg: dict, context: int, kv_per_pos: int) -> tuple[int, int]:
    """Bytes one decode step of the fp32 untied ONNX artifact must read, from first principles and file sizes: every
    byte of model.onnx.data is a weight and all of them but the gathered fp32 table E (V x d x 4 B; one row of it
    instead) are read every step, plus the KV cache filled so far; model.onnx (graph + small inline constants) bounds
    what else can be. (low, high)."""
    table, row = cfg["vocab_size"] * cfg["dim"] * 4, cfg["dim"] * 4
    data, graph = ((folder / f).stat().st_size for f in ("model.onnx.data", "model.onnx"))
    low = data - table + row + context * kv_per_pos
    return low, low + graph


def _positive(d: dict, keys):
    for k in keys:
        assert isinstance(d[k], int | float) and d[k] > 0, (k, d[k])


def test_host_json_fields(host_result, onnx_untied, kv_per_position, ort_ops):
    d = host_result
    assert d["where"] == "host" and d["schema"] == 1
    _positive(d["machine"], ["cores"])
    assert d["machine"]["cpu"] and len(d["machine"]["loadavg"]) == 3
    files = d["artifact"]["deploy_files"]
    on_disk = sum((onnx_untied / f).stat().st_size for f in files)
    assert d["artifact"]["deployed_bytes"] == sum(files.values()) == on_disk
    (run,) = d["runs"]
    assert run["threads"] == 1 and run["prompt_len"] == 8
    _positive(run, ["load_s", "prefill_tok_s", "decode_tok_s", "decode_tok_s_p50", "ttft_ms", "step_p50_ms"])
    _positive(run, ["step_p90_ms", "peak_rss_mb", "session_rss_mb"])
    assert run["step_p90_ms"] >= run["step_p50_ms"] and run["peak_rss_mb"] >= run["base_rss_mb"]
    _positive(d["bandwidth"], ["copy_gbs", "read_gbs"])
    (roof,) = d["roofline"]
    _positive(roof, ["host_roofline_tok_s", "host_roofline_fraction"])
    assert set(roof["phones_projected"]) == set(PHONES) and "PROJECTION" in roof["label"]
    # the roofline divides the measured bandwidth by what a step reads at the mean decode context (prompt + gen / 2):
    # the bytes it implies are the deployed weights less the gathered table, one row, and the measured KV cache
    bw = d["bandwidth"]["read_gbs"] * 1e9
    low, high = _no_table_bytes(onnx_untied, d["artifact"]["model"], 8 + 4 // 2, kv_per_position)
    assert low * (1 - 1e-9) <= bw / roof["host_roofline_tok_s"] <= high * (1 + 1e-9)
    assert roof["host_decode_tok_s"] == run["decode_tok_s_p50"]  # the projected rate is the run's measured one
    for phone in roof["phones_projected"].values():  # a phone with k x the host's bandwidth: k x the host's rates
        k = phone["bandwidth_gbs"] * 1e9 / bw
        assert phone["roofline_tok_s"] == pytest.approx(k * roof["host_roofline_tok_s"], rel=1e-9)
        assert phone["at_host_efficiency_tok_s"] == pytest.approx(k * roof["host_decode_tok_s"], rel=1e-9)
    prof = d["decode_profile"]
    assert prof["functions_us_per_step"] and set(prof["ops_share"]) == ort_ops
    # the traced kernels of the measured steps ran one after another (one thread) inside those steps' wall time
    assert sum(prof["ops_us_per_step"].values()) <= prof["step_us"]


def test_decode_profile_op_shares(onnx_untied, ort_ops):
    """Over 32 decode steps: the trace names exactly the op types ORT runs, each timed inside the steps' wall time,
    and MatMul, which reads the ~9 MB of streamed weights every step (the other ops touch d-sized vectors), takes
    more than an average op type's share (~0.3 against 1/27 here: other op types would have to gain ~7x the steps'
    whole kernel time, e.g. from preemptions on a shared host, to break it)."""
    prof = bench.profile_decode(onnx_untied, 1, 8, 2 + 32)
    assert prof["steps"] == 32 and set(prof["ops_share"]) == ort_ops
    assert sum(prof["ops_us_per_step"].values()) <= prof["step_us"]
    assert prof["ops_share"]["MatMul"] > 1 / len(ort_ops), prof["ops_share"]


def test_bytes_per_token_matches_weights(onnx_untied, kv_per_position):
    """Every initializer is counted once: the gathered-only table is exactly the fp32 E, the rest is streamed, and
    together they are the weights in the deployed files (external data + small inline constants). A step's bytes
    at a long context (KV cache ~4 % of the weights) agree with the file sizes and the measured cache."""
    meta = bench.artifact_info(onnx_untied)
    cfg = meta["config"]
    streamed, gather = weight_split(onnx_untied, meta)
    assert gather == cfg["vocab_size"] * cfg["dim"] * 4
    data = (onnx_untied / "model.onnx.data").stat().st_size
    assert data <= streamed + gather <= meta["deployed_bytes"]
    tb = token_bytes(onnx_untied, meta, 200)
    assert tb.gather_row == cfg["dim"] * 4 and tb.kv_read == 200 * kv_per_position
    low, high = _no_table_bytes(onnx_untied, cfg, 200, kv_per_position)
    assert low <= tb.total <= high


def test_projection_scales_with_bandwidth_and_bytes():
    """Decode is bandwidth bound: 10 GB/s over 10 MB a token is at most 1000 tok/s; twice the bandwidth, twice that;
    a context whose KV cache has grown as large as the weights (twice the bytes), half; every phone keeps the host's
    measured fraction of its roofline, so it scales the measured rate by its bandwidth."""
    w = 10**7
    short = TokenBytes(streamed=w, gather_tables=0, gather_row=0, kv_read=0, context=0, total=w)
    long = dataclasses.replace(short, kv_read=w, context=1000, total=2 * w)
    p = projection(short, 10.0, 400.0)
    assert p["host_roofline_tok_s"] == pytest.approx(1000.0) and p["host_roofline_fraction"] == pytest.approx(0.4)
    assert projection(short, 20.0, 400.0)["host_roofline_tok_s"] == pytest.approx(2000.0)
    assert projection(long, 10.0, 400.0)["host_roofline_tok_s"] == pytest.approx(500.0)
    assert projection(long, 10.0, 400.0)["host_roofline_fraction"] == pytest.approx(0.8)
    for name, phone in p["phones_projected"].items():
        assert phone["bandwidth_gbs"] == PHONES[name].bandwidth_gbs
        assert phone["roofline_tok_s"] == pytest.approx(100.0 * phone["bandwidth_gbs"])
        assert phone["at_host_efficiency_tok_s"] == pytest.approx(40.0 * phone["bandwidth_gbs"])


def test_bytes_per_token_shared_table_streamed(et_fp32_dir, kv_per_position):
    """A table shared by the gather and the head (shared-z, one copy in model.ptd) is read in full every step."""
    meta = bench.artifact_info(et_fp32_dir)
    streamed, gather = weight_split(et_fp32_dir, meta)
    cfg = meta["config"]
    assert gather == 0 and streamed >= cfg["vocab_size"] * cfg["dim"] * 4
    assert streamed <= meta["deployed_bytes"]
    assert token_bytes(et_fp32_dir, meta, 3).kv_read == 3 * kv_per_position  # custom_sdpa: the filled positions only


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--threads", "0"], "--threads"),
        (["--threads", "one"], "--threads"),
        (["--prompt-len", "250", "--gen", "64"], "exceeds the model context"),
        (["--gen", "0"], "--gen"),
        (["--repeats", "0"], "--repeats"),
        (["--where", "moon"], "--where"),
    ],
)
def test_bad_flags_exit_2(onnx_untied, capsys, extra, says):
    code, err = cli(capsys, ["bench", onnx_untied, *extra])
    assert code == EXIT_BAD_INPUT and says in err and len(err.strip().splitlines()) == 1


def test_not_an_artifact_exit_2(tmp_path, capsys):
    code, err = cli(capsys, ["bench", tmp_path])
    assert code == EXIT_BAD_INPUT and "not an artifact" in err


@pytest.mark.skipif(shutil.which("adb") is not None, reason="adb is installed here: device presence varies")
def test_adb_without_device_exit_4(onnx_untied, capsys, tmp_path):
    out = tmp_path / "r.json"
    code, err = cli(capsys, ["bench", onnx_untied, "--where", "adb", "--out", out, *SMALL])
    assert code == EXIT_UNAVAILABLE and len(err.strip().splitlines()) == 1 and "adb" in err
    assert not out.exists()  # no fake results


EMU_READY = (emu.EMU_ROOT / ".complete").is_file() and shutil.which(emu.QEMU) is not None


@pytest.mark.skipif(not EMU_READY, reason=f"no emulated ARM64 root at {emu.EMU_ROOT} (run `make emu`)")
def test_arm64_emu_parity(onnx_untied):
    data = bench.bench(onnx_untied, "arm64-emu", bench.BenchConfig((1,), (8,), 2, 1))
    (run,) = data["runs"]
    assert "EMULATED" in data["label"] and run["parity_gate"] is not None
    assert run["parity_ok"] and run["parity_top1_same"], run["parity_max_abs"]
    assert run["emulated_decode_tok_s"] > 0


@pytest.mark.skipif(not EMU_READY, reason=f"no emulated ARM64 root at {emu.EMU_ROOT} (run `make emu`)")
def test_arm64_emu_without_executorch_layer_exit_4(et_fp32_dir, capsys, monkeypatch):
    """A root built without the ExecuTorch layer (EMU_EXECUTORCH=0) refuses the .pte in one line, naming the fix."""
    monkeypatch.setitem(emu.LAYERS, "executorch", ".no-such-layer")
    code, err = cli(capsys, ["bench", et_fp32_dir, "--where", "arm64-emu", *SMALL])
    assert code == EXIT_UNAVAILABLE and "make emu" in err and len(err.strip().splitlines()) == 1


def test_prompt_tokens_in_vocab():
    from pit_export.runtimes.timing import prompt_tokens

    t = prompt_tokens(300, 50)
    assert t.dtype == np.int64 and t.min() >= 0 and t.max() < 50
    assert np.array_equal(t, prompt_tokens(300, 50))


def test_cli_writes_results_where_documented(onnx_untied, capsys, monkeypatch, tmp_path):
    """Without --out, `pit-export bench` writes benchmarks/results/bench-<backend>-<where>.json under the working
    directory (cli.py's --out help, README). The measurement itself is stubbed: this is about where the JSON lands."""
    runs = [{"threads": 1, "prompt_len": 8, "decode_tok_s": 123.0}]
    monkeypatch.setitem(bench.PLACES, "host", lambda folder, info, cfg, progress: {"runs": runs})
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, ["bench", onnx_untied, *SMALL])
    assert code == 0, err
    (written,) = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()]
    assert written == "benchmarks/results/bench-onnx-host.json"
    data = json.loads((tmp_path / written).read_text())
    assert data["runs"] == runs and data["where"] == "host" and data["artifact"]["backend"] == "onnx"


@pytest.mark.slow
@pytest.mark.skipif(not EMU_READY or emu.qemu_plugins() is not None, reason="no plugin-capable QEMU + counting plugin")
def test_arm64_instruction_count(onnx_untied):
    counts = emu.instruction_counts(onnx_untied, bench.artifact_info(onnx_untied), 8, decode_steps=4)["arm64"]
    assert counts["arm64_instructions_per_decoded_token"] > 0 and counts["arm64_instructions_per_prefill_token"] > 0
    assert counts["context"] == 8 and [r["prompt"] for r in counts["runs"]] == [1, 8, 8]

"""pit-export bench: the JSON it writes, its exit codes, the bytes-per-token accounting, the emulated ARM64 path.
No timing assertions: timings are measurements (benchmarks/results), not test outcomes."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pit_export import bench, emu
from pit_export.errors import EXIT_BAD_INPUT, EXIT_UNAVAILABLE
from pit_export.roofline import PHONES, kv_bytes, token_bytes, weight_split

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


def _positive(d: dict, keys):
    for k in keys:
        assert isinstance(d[k], int | float) and d[k] > 0, (k, d[k])


def test_host_json_fields(host_result, onnx_untied):
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
    prof = d["decode_profile"]
    assert prof["functions_us_per_step"] and abs(sum(prof["ops_share"].values()) - 1) < 1e-9


def test_bytes_per_token_matches_weights(onnx_untied):
    """Every initializer is counted once: the gathered-only table is exactly the fp32 E, the rest is streamed, and
    together they are the weights in the deployed files (external data + small inline constants)."""
    meta = bench.artifact_info(onnx_untied)
    cfg = meta["config"]
    streamed, gather = weight_split(onnx_untied, meta)
    assert gather == cfg["vocab_size"] * cfg["dim"] * 4
    data = (onnx_untied / "model.onnx.data").stat().st_size
    assert data <= streamed + gather <= meta["deployed_bytes"]
    tb = token_bytes(onnx_untied, meta, 10)
    assert tb.gather_row == cfg["dim"] * 4 and tb.kv_read == kv_bytes(cfg, 10)
    assert tb.total == streamed + tb.gather_row + tb.kv_read


def test_bytes_per_token_shared_table_streamed(et_fp32_dir):
    """A table shared by the gather and the head (shared-z, one copy in model.ptd) is read in full every step."""
    meta = bench.artifact_info(et_fp32_dir)
    streamed, gather = weight_split(et_fp32_dir, meta)
    cfg = meta["config"]
    assert gather == 0 and streamed >= cfg["vocab_size"] * cfg["dim"] * 4
    assert streamed <= meta["deployed_bytes"]
    assert token_bytes(et_fp32_dir, meta, 3).kv_read == kv_bytes(cfg, 3)  # custom_sdpa reads the filled positions only


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
def test_arm64_emu_refuses_executorch_with_reason(et_fp32_dir, capsys):
    code, err = cli(capsys, ["bench", et_fp32_dir, "--where", "arm64-emu", *SMALL])
    assert code == EXIT_UNAVAILABLE and "torch" in err and len(err.strip().splitlines()) == 1


def test_prompt_tokens_in_vocab():
    from pit_export.runtimes.timing import prompt_tokens

    t = prompt_tokens(300, 50)
    assert t.dtype == np.int64 and t.min() >= 0 and t.max() < 50
    assert np.array_equal(t, prompt_tokens(300, 50))


def test_results_default_path():
    assert bench.default_out({"backend": "onnx"}, "host") == Path("benchmarks/results/bench-onnx-host.json")


@pytest.mark.slow
@pytest.mark.skipif(not EMU_READY or emu.qemu_plugins() is not None, reason="no plugin-capable QEMU + counting plugin")
def test_arm64_instruction_count(onnx_untied):
    counts = emu.instruction_counts(onnx_untied, bench.artifact_info(onnx_untied), 8)
    assert counts["arm64"]["arm64_instructions_per_decoded_token"] > 0

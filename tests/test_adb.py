"""--where adb end to end against an emulated device: benchmarks/emu/device/adb is an `adb` whose one device is the
emulated ARM64 root (`make emu`); its `shell` runs commands there under QEMU. The LLM runner pushed to it is
benchmarks/emu/device/llama_main: llama_main's flags over ExecuTorch's own C++ TextLLMRunner, which prints the same
statistics as llama_main on a phone. Push, shell, parsing, cleanup and the error paths are the real code's."""

import os
import shutil
from pathlib import Path

import pytest

from pit_export import adb, bench, emu
from pit_export.errors import EXIT_UNAVAILABLE

from .test_faults import cli

DEVICE = Path(__file__).resolve().parents[1] / "benchmarks" / "emu" / "device"
EMU_READY = (emu.EMU_ROOT / ".complete").is_file() and shutil.which(emu.QEMU) is not None
ET_READY = EMU_READY and (emu.EMU_ROOT / emu.LAYERS["executorch"]).is_file()
SMALL = ["--threads", "1", "--gen", "4", "--repeats", "1"]


@pytest.fixture
def device(monkeypatch):
    """The stand-in first on PATH, its device the emulated root; returns where the device's storage lands."""
    monkeypatch.setenv("PATH", f"{DEVICE}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PIT_EMU_ROOT", str(emu.EMU_ROOT.resolve()))
    monkeypatch.delenv("PIT_ADB_RUNNER", raising=False)
    return emu.EMU_ROOT.resolve() / adb.REMOTE.lstrip("/")


@pytest.fixture(scope="module")
def pte(pit_ckpt, tmp_path_factory):
    """The android preset (8da4w + 4-bit embedding, untied, custom LLM ops): what ships."""
    from pit_export.export import export_artifact

    out = tmp_path_factory.mktemp("adb") / "android"
    export_artifact(pit_ckpt, "android", out)
    return out


def runner_script(tmp_path, body: str) -> Path:
    p = tmp_path / "llama_main"
    p.write_text(f"#!/bin/sh\n{body}\n")
    p.chmod(0o755)
    return p


def test_no_device_exit_4(monkeypatch, tmp_path, et_fp32_dir, capsys):
    """adb is there but lists no device (the stand-in without a root): one line, exit 4, no result file."""
    monkeypatch.setenv("PATH", f"{DEVICE}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PIT_EMU_ROOT", str(tmp_path / "no-root"))
    out = tmp_path / "r.json"
    code, err = cli(capsys, ["bench", et_fp32_dir, "--where", "adb", "--out", out, *SMALL])
    assert code == EXIT_UNAVAILABLE and "no Android device" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.skipif(not EMU_READY, reason=f"no emulated ARM64 root at {emu.EMU_ROOT} (run `make emu`)")
def test_no_runner_exit_4(device, et_fp32_dir, capsys):
    code, err = cli(capsys, ["bench", et_fp32_dir, "--where", "adb", *SMALL])
    assert code == EXIT_UNAVAILABLE and "PIT_ADB_RUNNER" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not EMU_READY, reason=f"no emulated ARM64 root at {emu.EMU_ROOT} (run `make emu`)")
def test_runner_failure_is_one_line_and_cleans_up(device, et_fp32_dir, tmp_path, monkeypatch, capsys):
    """A runner that fails on the device (here: an aarch64 /bin/sh script exiting 3): exit 4 with its last line, and
    nothing left on the device."""
    monkeypatch.setenv("PIT_ADB_RUNNER", str(runner_script(tmp_path, "echo 'cannot load model.pte' >&2; exit 3")))
    code, err = cli(capsys, ["bench", et_fp32_dir, "--where", "adb", *SMALL])
    assert code == EXIT_UNAVAILABLE and "cannot load model.pte" in err and len(err.strip().splitlines()) == 1
    assert not device.exists()


@pytest.mark.skipif(not EMU_READY, reason=f"no emulated ARM64 root at {emu.EMU_ROOT} (run `make emu`)")
def test_runner_without_statistics_exit_4(device, et_fp32_dir, tmp_path, monkeypatch, capsys):
    """The runner ran (and found the pushed files on the device) but printed no statistics: exit 4, no made-up
    numbers. (Shell builtins only: the emulated /bin/sh cannot exec other aarch64 programs without binfmt.)"""
    files = " ".join(f"[ -f {adb.REMOTE}/{f} ] || exit 9;" for f in ("model.pte", "model.ptd", "tokenizer.json"))
    body = f'{files} echo "hello"'
    monkeypatch.setenv("PIT_ADB_RUNNER", str(runner_script(tmp_path, body)))
    code, err = cli(capsys, ["bench", et_fp32_dir, "--where", "adb", *SMALL])
    assert code == EXIT_UNAVAILABLE and "no statistics" in err
    assert not device.exists()


@pytest.mark.slow
@pytest.mark.skipif(not ET_READY, reason=f"no ExecuTorch in the emulated root {emu.EMU_ROOT} (run `make emu`)")
def test_llm_runner_on_emulated_device(device, pte, monkeypatch):
    """The shipped .pte through ExecuTorch's LLM runner on the emulated device: prompt and decode rates, time to
    first token and RSS parsed from the runner's own statistics, and the device left clean."""
    monkeypatch.setenv("PIT_ADB_RUNNER", str(DEVICE / "llama_main"))
    gen = 6
    data = bench.bench(pte, "adb", bench.BenchConfig((1,), (8,), gen, 1))
    (run,) = data["runs"]
    n_prompt = adb.prompt_len(pte)
    assert run["prompt_tokens"] == n_prompt == data["runner"]["prompt_tokens"]
    assert 1 <= run["generated_tokens"] <= gen  # seq_len = prompt + gen; the first token comes from the prefill
    assert run["prefill_tok_s"] > 0 and run["decode_tok_s"] > 0 and run["ttft_ms"] > 0 and run["load_s"] >= 0
    assert run["peak_rss_mb"] > 0  # the Python binding logs the RSS lines to stderr
    assert data["device"]["serial"] == "emulator-arm64" and "emulated" in data["device"]["model"]
    assert not device.exists()

"""Emulated ARM64 (QEMU user mode, `make emu`): the artifacts' own runtimes executing aarch64 code (XNNPACK's and ONNX
Runtime's ARM64 kernels), validated with the host's metrics and gates, and counted in executed instructions.

Without the emulated root these tests skip (CI does not download it); the error paths run everywhere."""

import shutil

import numpy as np
import pytest
from pit_export.runtimes import open_session

from pit_export import bench, emu
from pit_export.errors import EXIT_BAD_INPUT, EXIT_UNAVAILABLE, BadInput, PitError, Unavailable
from pit_export.validate import ValidateConfig, Validator

from .test_faults import cli

EMU_READY = (emu.EMU_ROOT / ".complete").is_file() and shutil.which(emu.QEMU) is not None
ET_READY = EMU_READY and (emu.EMU_ROOT / emu.LAYERS["executorch"]).is_file()
needs_emu = pytest.mark.skipif(not EMU_READY, reason=f"no emulated ARM64 root at {emu.EMU_ROOT} (run `make emu`)")
needs_et = pytest.mark.skipif(not ET_READY, reason=f"no ExecuTorch in the emulated root {emu.EMU_ROOT} (`make emu`)")
needs_counter = pytest.mark.skipif(
    not EMU_READY or emu.qemu_plugins() is not None, reason="no plugin-capable QEMU + counting plugin"
)
EMU_CFG = ValidateConfig(n_windows=1, n_greedy=16)  # emulation is slow: one window, 16 greedy tokens


@pytest.fixture(scope="module")
def onnx_preset(pit_ckpt, tmp_path_factory):
    """The onnx-cpu preset (8da4w, shared-z): int8 compute, whose ARM64 kernels differ from the x86 ones."""
    from pit_export.export import export_artifact

    out = tmp_path_factory.mktemp("emu") / "onnx-cpu"
    export_artifact(pit_ckpt, "onnx-cpu", out)
    return out


@pytest.fixture(scope="module")
def android_preset(pit_ckpt, tmp_path_factory):
    """The android preset: 8da4w + 4-bit embedding, untied, with the LLM custom ops."""
    from pit_export.export import export_artifact

    out = tmp_path_factory.mktemp("emu") / "android"
    export_artifact(pit_ckpt, "android", out)
    return out


# ---------------------------------------------------------------- errors: one line, distinct codes, no emulator needed


def test_validate_where_needs_artifact(capsys):
    code, err = cli(capsys, ["validate", "pit-tiny", "--where", "arm64-emu"])
    assert code == EXIT_BAD_INPUT and "--artifact" in err and len(err.strip().splitlines()) == 1


def test_validate_where_unknown(capsys, tmp_path):
    code, err = cli(capsys, ["validate", "pit-tiny", "--artifact", tmp_path, "--where", "phone"])
    assert code == EXIT_BAD_INPUT and "--where" in err


def test_validate_without_root_exit_4(capsys, monkeypatch, tmp_path, pit_ckpt):
    from pit_export.export import export_artifact

    art = tmp_path / "o"
    export_artifact(pit_ckpt, "onnx-cpu", art, scheme="fp32", layout="untied")
    monkeypatch.setattr(emu, "EMU_ROOT", tmp_path / "no-root")
    code, err = cli(capsys, ["validate", "pit-tiny", "--artifact", art, "--where", "arm64-emu"])
    assert code == EXIT_UNAVAILABLE and len(err.strip().splitlines()) == 1
    assert "make emu" in err or "qemu" in err


def test_root_refuses_what_cannot_run_there():
    with pytest.raises(Unavailable, match="Apple"):
        emu.root("coreml")


def test_count_plan_differences():
    """The three counting runs cancel start-up, load and one-time setup: per-token costs are their differences."""
    p, g = 64, 8
    start, pre, dec, first = 10_000_000, 3000, 5000, 7777  # any linear cost model of the runs
    counts = [start + n * pre + first + (gen - 1) * dec for n, gen in emu.count_plan(p, g)]
    res = emu.per_token(counts, p, g, "model", "arm64")
    assert res["arm64_instructions_per_prefill_token"] == pre
    assert res["arm64_instructions_per_decoded_token"] == dec
    with pytest.raises(BadInput):
        emu.count_plan(1, 8)


def check_on_arm64(ckpt, folder):
    """The artifact in `folder` validated through the emulated ARM64 runtime against `ckpt`'s training graph."""
    with Validator(ckpt, EMU_CFG, threads=1) as v:
        sess = emu.open_session(folder)
        try:
            return v.check(sess)
        finally:
            sess.close()


# ---------------------------------------------------------------- ONNX Runtime on ARM64 (light root)


@needs_emu
def test_validate_onnx_preset_on_arm64(pit_ckpt, onnx_preset):
    """The onnx-cpu preset through ONNX Runtime's ARM64 kernels: the same metrics and gates as on the host."""
    res = check_on_arm64(pit_ckpt, onnx_preset)
    assert "emulated arm64" in res.session
    assert res.gates and res.passed, [g for g in res.failures()]
    assert res.metrics["positions"] == pit_ckpt.config.max_seq_len  # one whole window


@needs_emu
def test_emulated_errors_cross_as_one_line(onnx_preset):
    """A runtime error inside the root is one line on the host, and the session goes on serving."""
    sess = emu.open_session(onnx_preset)
    try:
        with pytest.raises(BadInput):  # checked on the host before anything crosses
            sess.prefill(np.array([sess.vocab_size]), 0)
        with pytest.raises(PitError) as e:  # raised by the artifact's Session inside the root
            sess.inner.unembed(np.zeros((2, sess.hidden_size + 1), np.float32))
        assert "\n" not in str(e.value)
        out = sess.prefill(np.arange(2, 10), 0)
        assert out.shape == (8, sess.vocab_size) and np.isfinite(out).all()
    finally:
        sess.close()
    assert sess.inner.proc.returncode == 0


# ---------------------------------------------------------------- ExecuTorch (XNNPACK) on ARM64


def _max_diff(a, b, toks):
    d = max(np.abs(a.prefill(toks, 0) - b.prefill(toks, 0)).max() for _ in range(1))
    d = max(d, np.abs(a.decode(7, len(toks)) - b.decode(7, len(toks))).max())
    d = max(d, np.abs(a.embed(toks) - b.embed(toks)).max())
    h = np.random.default_rng(0).standard_normal((4, a.hidden_size)).astype(np.float32)
    return max(d, np.abs(a.unembed(h) - b.unembed(h)).max())


@pytest.mark.slow
@needs_et
def test_fp32_pte_on_arm64_matches_host_and_passes(pit_ckpt, et_fp32_dir):
    """fp32: XNNPACK's ARM64 kernels agree with the host's within the fp32 gate (1e-4) on every entry point, and the
    artifact passes its fp32 gates run on ARM64."""
    arm, host = emu.open_session(et_fp32_dir), open_session(et_fp32_dir, threads=1)
    try:
        toks = np.arange(2, 34)
        assert _max_diff(arm, host, toks) <= emu.PARITY_ATOL["fp32"]
        host.close()
        with Validator(pit_ckpt, EMU_CFG, threads=1) as v:
            res = v.check(arm)
    finally:
        arm.close()
        host.close()
    assert res.scheme == "fp32" and res.passed, [g for g in res.failures()]


@pytest.mark.slow
@needs_et
def test_android_preset_on_arm64_passes(pit_ckpt, android_preset):
    """The shipped android artifact (8da4w + 4-bit embedding, custom LLM ops) through the ARM64 kernels a phone runs."""
    res = check_on_arm64(pit_ckpt, android_preset)
    assert res.gates and res.passed, [g for g in res.failures()]


@pytest.mark.slow
@needs_et
def test_bench_pte_on_arm64_parity(et_fp32_dir):
    data = bench.bench(et_fp32_dir, "arm64-emu", bench.BenchConfig((1,), (8,), 2, 1))
    (run,) = data["runs"]
    assert run["parity_gate"] == emu.PARITY_ATOL["fp32"] and run["parity_ok"] and run["parity_top1_same"]


def linear_macs(cfg: dict) -> int:
    """Multiply-accumulates of one token through every linear layer and the head (attention over the cache aside)."""
    d, f, hd = cfg["dim"], cfg["ffn_dim"], cfg["dim"] // cfg["n_heads"]
    per_layer = d * d * 2 + 2 * d * cfg["n_kv_heads"] * hd + 3 * d * f
    return cfg["n_layers"] * per_layer + cfg["vocab_size"] * d


@pytest.mark.slow
@needs_et
@needs_counter
def test_pte_instruction_counts_bound_by_the_math(et_fp32_dir):
    """Counted, per token: an fp32 token needs at least its MACs / 4 instructions (one 128-bit NEON FMLA does 4;
    Cortex-A76 has no wider vectors), on prefill and on decode."""
    info = bench.artifact_info(et_fp32_dir)
    counts = emu.instruction_counts(et_fp32_dir, info, 16, decode_steps=4)["arm64"]
    floor = linear_macs(info["config"]) / 4
    assert counts["arm64_instructions_per_decoded_token"] >= floor, counts
    assert counts["arm64_instructions_per_prefill_token"] >= floor, counts
    assert counts["context"] == 16

"""The command line as users run it: real subprocesses, exit codes, one-line errors, --json output."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import DEFAULT_MODEL

CLI = [sys.executable, "-m", "pit_export"]


def run(*args, ok=(0,)):
    p = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600)
    return p


def test_help_lists_commands():
    p = run("--help")
    assert p.returncode == 0
    for cmd in ("inspect", "fold", "validate", "generate", "train"):
        assert cmd in p.stdout


def test_inspect_json():
    p = run("inspect", DEFAULT_MODEL, "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["config"]["tying"] == "pit"
    assert 1.0 <= info["cond_T"] < 1e6
    assert info["ortho_err_max"] < 1e-5
    # W_out E = T (Z^T Z) T^-1 = I + T (Z^T Z - I) T^-1: exact up to the stored Z's orthonormality, amplified by cond(T)
    d = info["config"]["dim"]
    assert info["delta_TI_max"] <= info["cond_T"] * d * info["ortho_err_max"] + 1e-12
    assert info["interface"]["cosine_lstsq"]["min"] > 0.999  # PIT: E T^2 = W exactly


def _corrupt(tmp_path, edit):
    dst = tmp_path / "bad"
    shutil.copytree(DEFAULT_MODEL, dst)
    edit(dst)
    return dst


def _edit_tensors(fn):
    def edit(d):
        t = load_file(d / "model.safetensors")
        fn(t)
        save_file(t, d / "model.safetensors")

    return edit


def _truncate(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _set_nan(t):
    t["pit.l"][3, 1] = float("nan")


def _skew_z(t):
    t["pit.z"][:, 0] *= 1.01


def _neg_diag(t):
    t["pit.l"][5, 5] = -0.5


def _vocab_mismatch(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] += 1
    (d / "config.json").write_text(json.dumps(cfg))


CORRUPTIONS = {
    "nan in L": (_edit_tensors(_set_nan), "pit.l has 1 non-finite"),
    "non-orthonormal Z": (_edit_tensors(_skew_z), "pit.z is not orthonormal"),
    "negative L diagonal": (_edit_tensors(_neg_diag), "non-positive diagonal"),
    "truncated safetensors": (_truncate, "unreadable safetensors"),
    "config vocab mismatch": (_vocab_mismatch, "shape"),
    "missing tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json missing"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corrupted_checkpoint_one_line_error(tmp_path, case):
    edit, needle = CORRUPTIONS[case]
    bad = _corrupt(tmp_path, edit)
    # every command loads through the same checks; fold also proves nothing is written on bad input
    cmds = [["fold", bad, "--out", tmp_path / "out"]] if case == "nan in L" else [["inspect", bad]]
    for cmd in cmds:
        p = run(*cmd)
        assert p.returncode == 2, (case, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # nothing written on bad input


def test_bad_flag_values_exit_2(tmp_path):
    assert run("fold", DEFAULT_MODEL, "--out", tmp_path / "o", "--layout", "diagonal").returncode == 2
    assert run("inspect").returncode == 2
    assert not (tmp_path / "o").exists()


def test_fold_then_validate_and_generate(tmp_path):
    out = tmp_path / "folded"
    p = run("fold", DEFAULT_MODEL, "--out", out, "--layout", "shared-z", "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["interface_err_max"] <= 1e-5 and rep["interface_within_bound"]
    before = (out / "folded.safetensors").read_bytes()
    # an existing artifact is kept: without --force (exit 5), and with it when the re-fold fails (exit 2)
    assert run("fold", DEFAULT_MODEL, "--out", out, "--layout", "untied").returncode == 5
    assert run("fold", DEFAULT_MODEL, "--out", out, "--layout", "nope", "--force").returncode == 2
    assert (out / "folded.safetensors").read_bytes() == before
    p = run("validate", DEFAULT_MODEL, "--artifact", out, "--n-windows", "2", "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["passed"] and res["results"][0]["metrics"]["top1"] == 1.0
    g1 = json.loads(run("generate", out, "--prompt", "import os\n", "--max-new-tokens", "16", "--json").stdout)
    g2 = json.loads(
        run("generate", DEFAULT_MODEL, "--prompt", "import os\n", "--max-new-tokens", "16", "--json").stdout
    )
    assert g1["tokens"] == g2["tokens"] and len(g1["tokens"]) > 0


def test_gate_failure_exit_3(tmp_path):
    """A folded model whose head was tampered with fails the gates with exit code 3."""
    out = tmp_path / "folded"
    assert run("fold", DEFAULT_MODEL, "--out", out, "--layout", "untied").returncode == 0
    t = load_file(out / "folded.safetensors")
    t["output.weight"] = t["output.weight"] + 1e-3 * torch.randn_like(t["output.weight"])
    save_file(t, out / "folded.safetensors")
    p = run("validate", DEFAULT_MODEL, "--artifact", out, "--n-windows", "1", "--n-greedy", "8")
    assert p.returncode == 3, p.stderr
    assert "gate failed" in p.stderr


def test_shipped_models_by_name(tmp_path, capsys, monkeypatch):
    """A bare name that is no path here names a shipped model; a folder of that name in the working folder wins."""
    from .conftest import TIED_MODEL
    from .test_faults import cli

    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, ["inspect", "pit-tiny", "--json"])
    assert code == 0, err
    code, err = cli(capsys, ["inspect", "pit-large"])
    assert code == 2 and "pit-tiny" in err and "tied-tiny" in err, err
    code, err = cli(capsys, ["fold", "pit-tiny", "--out", DEFAULT_MODEL / "sub"])  # the name resolves as an input
    assert code == 5 and "lies inside the input" in err, err
    shutil.copytree(TIED_MODEL, tmp_path / "pit-tiny")
    p = subprocess.run([*CLI, "inspect", "pit-tiny", "--json"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0 and json.loads(p.stdout)["config"]["tying"] == "tied", p.stderr

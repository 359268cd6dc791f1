"""Every validation gate is guarded by an artifact damaged in exactly the way that gate must see.

A good fp32 artifact of each backend (the folded PyTorch model, ONNX, ExecuTorch, CoreML) is damaged in the files that
ship (model.onnx.data and model.ort, model.pte, the CoreML weight.bin, folded.safetensors): one tensor found by its
bytes, edited in place. `pit-export validate` with a gate on every metric must then fail the gate that the damage
concerns, by name, with exit 3, and where the damage cannot reach a metric (an embedding row of a token the windows
never use reaches no logit) that metric's gates must still pass.

Gate thresholds follow from the fp32 logit gate eps = 1e-4 (|delta logit| <= eps everywhere): KL <= eps^2 / 2 per
position, |log ppl ratio| <= 2 eps, 1 - cosine <= eps^2 / (2 rms^2) with the smallest per-position logit rms of the
reference (> 1 here, so 1e-8 is implied), round-trip logits within eps, every argmax kept.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pit_export.errors import EXIT_GATE

from .conftest import DEFAULT_MODEL

EPS = 1e-4
GATES = {
    "fp32": {
        "max_abs_logit": ["<=", EPS],
        "cosine_min": [">=", 1 - 1e-8],
        "kl_mean": ["<=", EPS**2 / 2],
        "kl_p99": ["<=", EPS**2 / 2],
        "ppl_ratio": ["<=", math.exp(2 * EPS)],
        "top1": [">=", 1.0],
        "greedy_agree": [">=", 1.0],
        "interface_err_max": ["<=", 1e-5],
        "round_trip_max_abs": ["<=", EPS],
        "round_trip_argmax": [">=", 1.0],
    }
}
LOGIT_GATES = {"max_abs_logit", "cosine_min", "kl_mean", "kl_p99", "ppl_ratio", "top1", "greedy_agree"}
INTERFACE_GATES = {"interface_err_max", "round_trip_max_abs", "round_trip_argmax"}
N_WINDOWS, N_GREEDY = 2, 16
BACKENDS = ["torch", "onnx-cpu", "android", "ios"]


@pytest.fixture(scope="module")
def plan(pit_ckpt):
    """The tokens validation will touch (its windows, greedy prompt and tokens), recorded as validate records them."""
    from pit_export.runtimes.pytorch import ReferenceSession

    from pit_export.fold import fold
    from pit_export.validate import Reference, ValidateConfig, heldout

    cfg = ValidateConfig(n_windows=N_WINDOWS, n_greedy=N_GREEDY)
    ref = Reference(ReferenceSession(pit_ckpt.model, 2), heldout(pit_ckpt), cfg, pit_ckpt.config.max_seq_len)
    used = set(ref.windows.ravel().tolist()) | set(ref.greedy) | set(ref.greedy_prompt)
    rms = min(np.sqrt((ref.window_logits(i).astype(np.float64) ** 2).mean(-1)).min() for i in range(N_WINDOWS))
    assert rms > 1  # the cosine gate's premise (module docstring)
    ref.close()
    unused = [t for t in range(pit_ckpt.config.vocab_size - 1, 1, -1) if t not in used]
    return {"unused": unused[:2], "first_greedy": ref.greedy[0], "folded": fold(pit_ckpt, "untied")[0].tensors}


@pytest.fixture(scope="module")
def good(backend, pit_ckpt, tmp_path_factory):
    from pit_export.export import export_artifact
    from pit_export.fold import fold, save_folded

    out = tmp_path_factory.mktemp(f"good-{backend}") / backend
    if backend == "torch":
        save_folded(out, *fold(pit_ckpt, "untied"), pit_ckpt)
    else:
        export_artifact(pit_ckpt, backend, out, "fp32", "untied")
    return out


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    return request.param


# ---------------------------------------------------------------- damage in the shipped bytes


def edit_tensor(folder: Path, original: np.ndarray, change) -> int:
    """Find `original` (fp32, as stored or transposed) in every file of the artifact and apply change(view) to each
    copy in place, through the logical [rows, cols] view. Returns the number of copies edited."""
    original = np.ascontiguousarray(original, dtype=np.float32)
    n = 0
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = bytearray(f.read_bytes())
        hit = False
        for transposed in (False, True):
            stored = np.ascontiguousarray(original.T if transposed else original)
            key, start = stored.tobytes(), 0
            while (i := data.find(key, start)) >= 0:
                view = np.frombuffer(data, np.float32, stored.size, i).reshape(stored.shape)
                view = view.T if transposed else view
                new = view.copy()
                change(new)
                (view if not transposed else view.T)[...] = new if not transposed else new.T
                hit, n, start = True, n + 1, i + len(key)
            if original.ndim < 2:
                break  # a vector's transpose is itself
        if hit:
            f.write_bytes(bytes(data))
    return n


def copy_artifact(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


@dataclass(frozen=True)
class Damage:
    tensor: str
    change: object  # (plan) -> change(view)
    must_fail: set  # gates this damage must fail
    must_pass: set  # gates it cannot reach


DAMAGES = {
    # an embedding row of a token no window, prompt or greedy step uses: only the interface probes can see it
    "embedding row scaled": Damage(
        "tok_embeddings.weight",
        lambda p: lambda v: v.__setitem__(p["unused"][0], v[p["unused"][0]] * 1.01),
        {"interface_err_max", "round_trip_max_abs"},
        LOGIT_GATES,
    ),
    # that token's embedding replaced by another's: its round trip now lands on the other token
    "embedding row swapped": Damage(
        "tok_embeddings.weight",
        lambda p: lambda v: v.__setitem__(p["unused"][0], v[p["unused"][1]]),
        {"round_trip_argmax", "interface_err_max"},
        LOGIT_GATES,
    ),
    # the head row of an unused token nudged by 0.1 %: every position's logit for it moves, no argmax does
    "head row nudged": Damage(
        "output.weight",
        lambda p: lambda v: v.__setitem__(p["unused"][0], v[p["unused"][0]] * 1.001),
        {"max_abs_logit"},
        {"top1", "greedy_agree"},
    ),
    # a norm gain scaled by 5 %: every logit moves, the distributions with them
    "norm gain scaled": Damage(
        "layers.1.ffn_norm",
        lambda p: lambda v: v.__imul__(1.05),
        {"max_abs_logit", "cosine_min", "kl_mean", "kl_p99", "ppl_ratio"},
        INTERFACE_GATES,
    ),
    # an unused token given twice the head row of the first greedy token: it wins where that token would
    "winning head row": Damage(
        "output.weight",
        lambda p: lambda v: v.__setitem__(p["unused"][0], 2 * v[p["first_greedy"]]),
        {"top1", "greedy_agree", "max_abs_logit"},
        set(),
    ),
}


def validate_cli(ckpt: Path, artifacts: list[Path], gates: Path) -> tuple[int, dict, str]:
    """`pit-export validate ... --json` through main(), in this process (a mutated validator is the one that runs)."""
    import io
    import sys
    from contextlib import redirect_stderr, redirect_stdout

    from pit_export.cli import main

    argv = ["pit-export", "validate", str(ckpt), "--gates", str(gates), "--json"]
    argv += ["--n-windows", str(N_WINDOWS), "--n-greedy", str(N_GREEDY)]
    for a in artifacts:
        argv += ["--artifact", str(a)]
    out, err, old = io.StringIO(), io.StringIO(), sys.argv
    debug = os.environ.pop("PIT_EXPORT_DEBUG", None)  # an earlier in-process --debug run leaves it set
    sys.argv = argv
    try:
        with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as e:
            main()
    finally:
        sys.argv = old
        if debug is not None:
            os.environ["PIT_EXPORT_DEBUG"] = debug
    # in-process, ExecuTorch's native runtime logs ("[threadpool.cpp:66] ...") reach this stderr too; the console
    # script silences them (tests/test_faults.py checks its one-line errors), so they are not the CLI's lines here
    lines = [ln for ln in err.getvalue().splitlines() if not re.match(r"\[\w+\.cpp:\d+\] ", ln)]
    return e.value.code, json.loads(out.getvalue()) if out.getvalue().strip() else {}, "\n".join(lines)


@pytest.fixture(scope="module")
def verdicts(backend, good, plan, tmp_path_factory):
    """One `validate` run per backend: the good artifact and each damaged copy against one reference recording."""
    root = tmp_path_factory.mktemp(f"damaged-{backend}")
    gates = root / "gates.json"
    gates.write_text(json.dumps(GATES))
    folders = {"good": good}
    for name, d in DAMAGES.items():
        folders[name] = copy_artifact(good, root / name.replace(" ", "-"))
        assert edit_tensor(folders[name], plan["folded"][d.tensor].numpy(), d.change(plan)) >= 1, (backend, name)
    code, out, err = validate_cli(DEFAULT_MODEL, list(folders.values()), gates)
    results = {name: r for name, r in zip(folders, out.get("results", []), strict=False)}
    return code, results, err


def failed(result: dict) -> set[str]:
    return {g["metric"] for g in result["gates"] if not g["passed"]}


def test_good_artifact_passes_every_gate(verdicts):
    code, results, err = verdicts
    assert code == EXIT_GATE, err[-2000:]  # the damaged ones fail
    assert len(results) == 1 + len(DAMAGES), err[-2000:]
    assert failed(results["good"]) == set(), results["good"]["metrics"]
    assert {g["metric"] for g in results["good"]["gates"]} == set(GATES["fp32"])  # every metric was gated
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: gate failed"), err[-2000:]


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damage_fails_its_gate(verdicts, damage):
    code, results, err = verdicts
    d, r = DAMAGES[damage], results[damage]
    missed = d.must_fail - failed(r)
    assert not missed, f"{damage}: gates {sorted(missed)} passed; metrics {r['metrics']}"
    reached = d.must_pass & failed(r)
    assert not reached, f"{damage}: gates {sorted(reached)} failed, but the damage cannot reach them"
    assert r["artifact"].endswith(damage.replace(" ", "-"))
    for metric in d.must_fail:  # the exit-3 line names the artifact and the metric
        assert f"{r['artifact']}: {metric}=" in err, err[-2000:]


@pytest.mark.slow
def test_every_validator_mutation_is_caught(tmp_path):
    """tests/mutate.py: each deliberate fault in validate.py makes the gate tests fail (also `make mutate`)."""
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-m", "tests.mutate", "--json", str(tmp_path / "m.json")],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert all(r["caught"] for r in json.loads((tmp_path / "m.json").read_text()))

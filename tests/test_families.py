"""The model families PIT is used on, built by transformers (random init, tied, an orthonormal token table so PIT
with T = I is exact, non-zero biases and norm gains, a prompt longer than the sliding window), imported with
`--init identity`: the training graph, the folded graph and every target's runtime reproduce transformers' own
logits over a prefill and 8 decode steps.

Tolerance: 1e-4 of the logit scale (max |logit|). The fp32 graphs differ from transformers only in op order
(n_layers * d-term sums, rounding ~gamma_d u each) and, on XNNPACK, in its tanh/GELU approximations; 1e-4 is the
fp32 parity the targets are held to."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from pit_export.models.checkpoint import load_checkpoint
from pit_export.models.pit import Transformer

from pit_export.fold import fold, gamma
from pit_export.hf_import import import_hf, read_config, read_tensors

from .conftest import DEFAULT_MODEL
from .hf_models import WINDOW, family_configs, save_family

FAMILIES = list(family_configs())
TOKENIZER = DEFAULT_MODEL / "tokenizer.json"
PROMPT, STEPS = 20, 8  # PROMPT > WINDOW: sliding layers mask part of the prompt
REL = 1e-4
FAST_TARGETS = "gemma3"  # every feature but biases and NoPE; the other families' targets run in make test-slow
FAST_FUSED = ("qwen2", "onnx-cpu")  # biases on onnx-cpu's fused graph (gemma3 takes the traced one)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """name -> (transformers model, HF folder, imported PIT folder), built on first use."""
    made = {}

    def get(name):
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            hf = save_family(root / "hf", name, TOKENIZER)
            import_hf(root / "hf", root / "pit", init="identity", max_seq_len=64, n_windows=1, progress=lambda m: None)
            made[name] = hf, root / "hf", root / "pit"
        return made[name]

    return get


def reference(hf) -> tuple[list[int], np.ndarray]:
    """transformers' greedy continuation of a fixed prompt and its logits at every position of prompt + 8 steps."""
    prompt = torch.randint(0, hf.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        seq = hf.generate(prompt, max_new_tokens=STEPS, do_sample=False, pad_token_id=0)[0]
        logits = hf(seq[None, :-1]).logits[0].numpy()
    return seq.tolist(), logits


def session_logits(session, seq: list[int]) -> np.ndarray:
    rows = [session.prefill(np.array(seq[:PROMPT]), 0)]
    rows += [session.decode(seq[i], i)[None] for i in range(PROMPT, len(seq) - 1)]
    return np.concatenate(rows)


def assert_parity(got: np.ndarray, want: np.ndarray, what: str) -> None:
    scale = np.abs(want).max()
    err = np.abs(got - want).max()
    assert err <= REL * scale, f"{what}: max |Δlogit| {err:.3g} > {REL} x {scale:.3g}"


@pytest.mark.parametrize("name", FAMILIES)
def test_config_has_the_family_features(name, family):
    """The features the family's config asks for are on in the training-graph config (none silently dropped)."""
    _, src, _ = family(name)
    cfg = read_config(src, 64)
    hf = family_configs()[name]
    assert cfg.head_dim == getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    expect = {
        "llama3": dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        ),
        "qwen2": dict(qkv_bias=True, o_bias=False),
        "qwen3": dict(qk_norm=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "gemma3": dict(
            qk_norm=True,
            sandwich_norm=True,
            hidden_act="gelu_tanh",
            embed_scale=8.0,
            attn_scale=20**-0.5,
            sliding_window=WINDOW,
            layer_types=["sliding", "full"] * 2,
            rope_local_theta=10000.0,
            final_softcap=0.5,
        ),
        "smollm3": dict(nope_layers=[3]),
    }[name]
    assert {k: getattr(cfg, k) for k in expect} == expect


@pytest.mark.parametrize("name", FAMILIES)
def test_training_graph_matches_transformers(name, family):
    hf, src, _ = family(name)
    cfg = read_config(src, 64)
    ours = Transformer.from_checkpoint_state(cfg, read_tensors(src, cfg))
    x = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = hf(x).logits, ours(x)
    # same weights, different op order: rounding error relative to the logit scale ~ depth * gamma_d
    tol = 4 * cfg.n_layers * gamma(cfg.dim) * b.abs().max().item()
    assert (a - b).abs().max().item() <= tol


@pytest.mark.parametrize("name", FAMILIES)
def test_identity_import_and_fold_match_transformers(name, family):
    """PIT with Z = E0, T = I (the training graph) and its fold (the graph every backend exports), in PyTorch."""
    from pit_export.runtimes.pytorch import FoldedSession

    hf, _, pit = family(name)
    ckpt = load_checkpoint(pit)
    seq, want = reference(hf)
    with torch.no_grad():
        got = ckpt.model(torch.tensor(seq[:-1])[None])[0].numpy()
    assert_parity(got, want, f"{name} training graph")
    for layout in ("untied", "shared-z"):
        assert_parity(session_logits(FoldedSession(fold(ckpt, layout)[0]), seq), want, f"{name} folded {layout}")


def _targets(fast: str) -> list:
    out = []
    for name in FAMILIES:
        for target in ("android", "onnx-cpu", "ios"):
            marks = () if name == fast or (name, target) == FAST_FUSED else (pytest.mark.slow,)
            out.append(pytest.param(name, target, marks=marks, id=f"{name}-{target}"))
    return out


@pytest.mark.parametrize(("name", "target"), _targets(FAST_TARGETS))
def test_target_matches_transformers(name, target, family, tmp_path):
    """The fp32 artifact through its own runtime (ExecuTorch/XNNPACK, ONNX Runtime, the MIL program), prefill and
    decode; the onnx-cpu folder also through onnxruntime-genai, whose greedy tokens must be transformers'."""
    from pit_export.runtimes import open_session

    from pit_export.export import export_artifact

    hf, _, pit = family(name)
    seq, want = reference(hf)
    export_artifact(load_checkpoint(pit), target, tmp_path / target, scheme="fp32")
    session = open_session(tmp_path / target)
    assert_parity(session_logits(session, seq), want, f"{name} {target}")
    if target == "android" and load_checkpoint(pit).config.has_sliding:
        # sliding layers keep a ring of 2 x window slots (ExecuTorch's RingKVCache): a forward call takes up to the
        # window, so the runner (and the session) prefill the 20-token prompt in calls of 8, and the 28 positions
        # above wrapped the 16 slots; a prefill rewinding within the ring repeats the first pass, one past it is refused
        md = json.loads((tmp_path / target / "pit_export.json").read_text())["executorch"]["metadata"]
        assert (md["get_max_seq_len"], md["get_max_context_len"]) == (WINDOW, load_checkpoint(pit).config.max_seq_len)
        n = len(seq) - 1
        first = session.prefill(np.asarray(seq[:n]), 0)
        again = session.prefill(np.asarray(seq[n - 5 : n]), n - 5)
        np.testing.assert_allclose(again, first[n - 5 :], atol=1e-5 * np.abs(first).max())
        with pytest.raises(ValueError, match="ring"):
            session.prefill(np.asarray(seq[2:4]), 2)
    session.close()
    if target == "onnx-cpu":
        from pit_export.runtimes.genai import genai_greedy

        assert genai_greedy(tmp_path / target, seq[:PROMPT], STEPS) == seq[PROMPT:]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_family_exports_every_target(name, family, tmp_path):
    """fp32 on every target passes the fp32 gates; each target's preset exports and runs (its quality is judged on
    trained models, so its gates are not asserted on a random teacher)."""
    _, _, pit = family(name)
    cli = [sys.executable, "-m", "pit_export"]
    p = subprocess.run(
        [*cli, "export", pit, "--target", "all", "--scheme", "fp32", "--out", tmp_path / "fp32"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((tmp_path / "fp32" / "report.json").read_text())
    assert report
    p = subprocess.run(
        [*cli, "export", pit, "--target", "all", "--no-validate", "--out", tmp_path / "preset"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    from pit_export.runtimes import open_session

    for target in ("android", "onnx-cpu", "ios"):
        s = open_session(tmp_path / "preset" / target)
        logits = s.prefill(np.arange(PROMPT), 0)
        assert logits.shape == (PROMPT, 4096) and np.isfinite(logits).all()
        s.close()


# ---------------------------------------------------------------- a PIT model trained elsewhere, in HF layout


def run_cli(capsys, argv) -> tuple[int, str, str]:
    """main() in-process; (exit code, stdout, stderr)."""
    from pit_export.cli import main

    old, sys.argv = sys.argv, ["pit-export", *map(str, argv)]
    try:
        with pytest.raises(SystemExit) as e:
            main()
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def save_pit_hf(dest, model, convention: str, z=None, l=None):
    """A PIT training-graph model as an HF Llama folder holding Z and L (as `pit.l`, or as `pit.l_strict` +
    `pit.l_log_diag`): what a PIT model trained with another codebase looks like."""
    from safetensors.torch import save_file

    from pit_export.hf_import import hf_name

    from .hf_models import llama_config

    cfg = model.cfg
    dest.mkdir(parents=True)
    sd = {hf_name(k, cfg): v.contiguous() for k, v in model.state_dict().items() if not k.startswith("pit.")}
    Z = model.pit.z if z is None else z
    L = model.pit.cholesky_factor() if l is None else l
    sd["model.pit.z"] = Z.contiguous()
    if convention == "factor":
        sd["model.pit.l"] = L.contiguous()
    else:
        sd["model.pit.l_strict"] = torch.tril(L, -1).contiguous()
        sd["model.pit.l_log_diag"] = torch.diagonal(L).log().contiguous()
    save_file(sd, dest / "model.safetensors")
    llama_config(cfg).to_json_file(dest / "config.json")
    (dest / "tokenizer.json").write_bytes(TOKENIZER.read_bytes())
    return dest


@pytest.fixture(scope="module")
def pit_model(pit_ckpt):
    """The shipped trained PIT model (cond(T) well above 1): validation gates are meaningful on it."""
    return pit_ckpt.model


@pytest.mark.parametrize("convention", ["factor", "strict+log-diag"])
def test_pit_in_hf_layout_is_kept(convention, pit_model, tmp_path, capsys):
    """Z and L are taken as stored (no polar re-initialisation): the imported checkpoint's logits are the model's."""
    src = save_pit_hf(tmp_path / "src", pit_model, convention)
    code, out, err = run_cli(capsys, ["import-hf", src, "--out", tmp_path / "out", "--max-seq-len", "256", "--json"])
    assert code == 0, err
    rep = json.loads(out)
    assert rep["init"] == "kept" and rep["kl_mean"] is None
    c = load_checkpoint(tmp_path / "out")
    assert torch.equal(c.model.pit.z, pit_model.pit.z)
    assert torch.allclose(c.model.pit.cholesky_factor(), pit_model.pit.cholesky_factor(), rtol=2**-23, atol=0)
    x = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = c.model(x), pit_model(x)
    assert (a - b).abs().max().item() <= 4 * gamma(c.config.dim) * b.abs().max().item()
    argv = ["validate", tmp_path / "out", "--n-windows", "1", "--n-greedy", "8", "--layout", "untied"]
    code, _, err = run_cli(capsys, argv)
    assert code == 0, err


@pytest.mark.parametrize(
    "damage, says",
    [
        ("z scaled", "not orthonormal"),
        ("l upper", "not lower-triangular"),
        ("l negative diagonal", "non-positive diagonal"),
        ("l strict with diagonal", "on or above the diagonal"),
        ("z missing", "need Z and L"),
    ],
)
def test_pit_in_hf_layout_refused(damage, says, pit_model, tmp_path, capsys):
    from pit_export.errors import EXIT_BAD_INPUT

    Z, L = pit_model.pit.z.clone(), pit_model.pit.cholesky_factor().clone()
    convention = "factor"
    if damage == "z scaled":
        Z = Z * 1.01
    elif damage == "l upper":
        L[0, 1] = 0.1
    elif damage == "l negative diagonal":
        L[3, 3] = -L[3, 3]
    src = save_pit_hf(tmp_path / "src", pit_model, convention, Z, L)
    if damage in ("l strict with diagonal", "z missing"):
        from safetensors.torch import load_file, save_file

        sd = load_file(src / "model.safetensors")
        if damage == "z missing":
            sd.pop("model.pit.z")
        else:
            sd.pop("model.pit.l")
            sd["model.pit.l_strict"], sd["model.pit.l_log_diag"] = L, torch.diagonal(L).log()
        save_file(sd, src / "model.safetensors")
    code, _, err = run_cli(capsys, ["import-hf", src, "--out", tmp_path / "out", "--max-seq-len", "32"])
    assert code == EXIT_BAD_INPUT, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # progress lines may precede it
    assert len(errors) == 1 and says in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the user's own text


def test_eval_text_is_scored_and_named(pit_ckpt, tmp_path, capsys):
    """export/validate --eval-text: perplexity on that text (not the shipped split), named with its sha256."""
    import hashlib

    from pit_export.models.corpus import load_heldout

    text = tmp_path / "domain.txt"
    text.write_text("\n\n".join(load_heldout()[:40]))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, ["export", DEFAULT_MODEL, "--target", "onnx-cpu", "--scheme", "fp32", "--out", out,
                             "--eval-text", text, "--n-windows", "2", "--n-greedy", "8"])  # fmt: skip
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["eval_text"] == {"source": str(text), "sha256": hashlib.sha256(text.read_bytes()).hexdigest()}
    assert rep["eval_text"]["sha256"][:16] in (out / "report.md").read_text()
    assert json.loads((out / "manifest.json").read_text())["eval_text"] == rep["eval_text"]
    args = ["validate", DEFAULT_MODEL, "--artifact", out / "onnx-cpu", "--n-windows", "2", "--json"]
    ppl = {}
    for extra in ([], ["--eval-text", text]):
        code, stdout, err = run_cli(capsys, [*args, *extra])
        assert code == 0, err
        ppl[bool(extra)] = json.loads(stdout)["results"][0]["metrics"]["ppl_ref"]
    assert ppl[True] != ppl[False]  # a different text, a different perplexity


def test_eval_text_too_short_is_bad_input(tmp_path, capsys):
    from pit_export.errors import EXIT_BAD_INPUT

    text = tmp_path / "short.txt"
    text.write_text("def f(x):\n    return x\n")
    for argv in (
        ["validate", DEFAULT_MODEL, "--eval-text", text],
        ["export", DEFAULT_MODEL, "--target", "onnx-cpu", "--out", tmp_path / "o", "--eval-text", text],
    ):
        code, _, err = run_cli(capsys, argv)
        assert code == EXIT_BAD_INPUT and "window" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_eval_text_is_tokenized_once_per_run(pit_ckpt, tmp_path, monkeypatch):
    """The CLI's up-front check and the validation read the same windows: the text is tokenized once, and again
    when the file changes."""
    from pit_export.models import train
    from pit_export.models.corpus import load_heldout

    from pit_export.validate import heldout

    text = tmp_path / "domain.txt"
    text.write_text("\n\n".join(load_heldout()[:40]))
    calls = []
    real = train.text_windows
    monkeypatch.setattr(train, "text_windows", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = heldout(pit_ckpt, str(text), 2)
    assert np.array_equal(heldout(pit_ckpt, str(text), 2), first) and len(calls) == 1
    text.write_text("\n\n".join(reversed(load_heldout()[:40])))
    assert not np.array_equal(heldout(pit_ckpt, str(text), 2), first) and len(calls) == 2

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
            marks = () if name == fast else (pytest.mark.slow,)
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

"""The training graph: PIT algebra, parametrisation, checkpoint round trip."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pit_export.models.checkpoint import load_checkpoint, orthonormality_error, save_checkpoint
from pit_export.models.pit import polar_factor, random_orthonormal

from pit_export.fold import reference_interface

from .conftest import random_pit


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), spread=st.floats(0.0, 1.0))
def test_head_is_pseudo_inverse_of_embedding(seed, spread):
    """(T Z^T)(Z T^-1) = I_d for every SPD T: the PIT identity, evaluated in float64.

    With the stored (fp32) Z, W E = I + T (Z^T Z - I) T^-1, so the error is at most cond(T) d |Z^T Z - I|max, plus
    float64 solve rounding."""
    m = random_pit(seed, spread=spread)
    L = m.pit.cholesky_factor().double()
    d, cond = m.cfg.dim, torch.linalg.cond(L @ L.T).item()
    err = (reference_interface(m) - torch.eye(d, dtype=torch.float64)).abs().max().item()
    assert err <= cond * d * orthonormality_error(m.pit.z) + 64 * d * 2.0**-52 * cond


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_embedding_is_z_times_t_inverse(seed):
    """Two fp32 triangular solves agree with Z T^-1 formed in float64, to fp32 solve accuracy (~d u cond(T))."""
    m = random_pit(seed)
    L = m.pit.cholesky_factor().double()
    T = L @ L.T
    want = m.pit.z.double() @ torch.linalg.inv(T)
    got = m.embed(torch.arange(m.cfg.vocab_size)).double()
    cond = torch.linalg.cond(T).item()
    assert (got - want).abs().max() <= 4 * m.cfg.dim * 2.0**-24 * cond * want.abs().max()


def test_l_diagonal_stays_positive_and_lower():
    m = random_pit(0, spread=3.0)
    L = m.pit.cholesky_factor()
    assert torch.all(torch.diagonal(L) > 0)
    assert torch.equal(torch.triu(L, 1), torch.zeros_like(L))


def test_orthonormal_inits():
    z = random_orthonormal(500, 40, torch.Generator().manual_seed(0))
    assert orthonormality_error(z) < 1e-6
    e0 = torch.randn(300, 24, dtype=torch.float64)
    u, h = polar_factor(e0)
    assert orthonormality_error(u) < 1e-12
    assert torch.allclose(u @ h, e0, atol=1e-10)
    assert torch.linalg.eigvalsh(h).min() > 0


def test_tied_and_untied_graphs_run():
    for tying in ("tied", "untied"):
        m = random_pit(1, tying=tying)
        logits = m(torch.randint(0, m.cfg.vocab_size, (2, 16)))
        assert logits.shape == (2, 16, m.cfg.vocab_size) and torch.isfinite(logits).all()


def test_checkpoint_round_trip_is_exact(tmp_path, pit_ckpt):
    m = random_pit(3, vocab=pit_ckpt.config.vocab_size)
    save_checkpoint(tmp_path / "ck", m, pit_ckpt.tokenizer)
    back = load_checkpoint(tmp_path / "ck")
    toks = torch.randint(0, m.cfg.vocab_size, (1, 20))
    # L goes through log/exp of its diagonal: exact up to one rounding of exp(log(x))
    np.testing.assert_allclose(back.model(toks).numpy(), m(toks).numpy(), rtol=0, atol=1e-5)
    assert back.ortho_error < 1e-5


def test_default_model_learned_something(pit_ckpt, tied_ckpt, heldout):
    """Held-out perplexity well below a unigram baseline, recomputed here (not read from the model card).

    The unigram is fitted on the other held-out windows: a stronger baseline than one fitted on the train split."""
    from pit_export.models.train import perplexity

    windows = torch.as_tensor(heldout[:8])
    counts = torch.bincount(torch.as_tensor(heldout[8:]).flatten(), minlength=pit_ckpt.config.vocab_size)
    logp = ((counts.double() + 1) / (counts.sum() + len(counts))).log()
    unigram = float(torch.exp(-logp[windows[:, 1:]].mean()))
    for ck in (pit_ckpt, tied_ckpt):
        ppl = perplexity(ck.model, windows)
        assert ppl < 0.5 * unigram, (ck.config.tying, ppl, unigram)

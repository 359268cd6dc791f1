"""Fold: the static inference graph matches the training graph, for random PIT models and the shipped one."""

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pit_export.runtimes.pytorch import FoldedSession, ReferenceSession

from pit_export.decoder import LAYOUTS, Decoder
from pit_export.errors import BadInput
from pit_export.fold import INTERFACE_PARAMS, U32, fold, interface_bound, interface_model, layouts_for
from pit_export.validate import GATES, ValidateConfig, eval_windows, validate

from .conftest import random_pit

BOUND_SLACK = 10  # see test_fold_interface_bound_holds_and_is_tight


@pytest.mark.parametrize("log_cond", [0, 2, 4, 5])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fold_interface_bound_holds_and_is_tight(layout, log_cond):
    """Adversarial T (cond(T) from ~3 to ~1.6e6): the reported |W E - (W E)_ref| is the one measured here, it lies
    inside fold.interface_bound entry by entry, and the bound is no looser than its derivation explains.

    How tight can it be? interface_bound = 2 gamma_{2d+4} |W||E| ~ (4d+8) u |W||E| covers fp32 storage *and* fp32
    evaluation of both chains; the reported error evaluates the stored weights exactly, so only storage rounding
    shows (at most ~u relative per stored factor). Those rounding errors are independent, so an entry of W E, a sum
    of V products, collects them like a random walk, ~sqrt(V) u |terms| rather than V u |terms|: observed / bound
    ~ 1 / ((4d+8) sqrt(V)) (~1/3900 at d=48, V=384). shared-z stores Z unrounded and multiplies it by itself,
    Z^T Z = I, which the absolute-value chain sees as the dense |Z|^T |Z| (entries ~2/pi): its bound is larger by
    kappa_Z = max(|T||Z|^T|Z||T^-1|) / max(|T||T^-1|), which grows with cond(T) (~5 at cond 3, ~500 at 1e6).
    BOUND_SLACK = 10 covers a rounding error's typical size (well under u) and the constants of the random-walk
    estimate: over 100 random models (cond(T) up to 1e7, every layout) the smallest observed / (bound / kappa) was
    0.45 / ((4d+8) sqrt(V)); the cases here range 0.8 to 34 / ((4d+8) sqrt(V)), so a bound inflated 1000x falls
    below the floor on every one of them."""
    m = random_pit(log_cond, spread=0.3)
    d, V = m.cfg.dim, m.cfg.vocab_size
    with torch.no_grad():  # L's log-diagonal spread over ln(cond)/2: cond(T) = cond(L)^2 ~ 10**log_cond
        a = math.log(10.0**log_cond) / 4
        m.pit.l_log_diag.copy_(torch.linspace(-a, a, d)[torch.randperm(d)])
    fw, rep = fold(m, layout)
    assert rep.cond_T >= 10.0**log_cond / 3  # the input really is as badly conditioned as intended

    # observed, independently of fold's chunked interface_product / reference_interface: the deployed decoder's
    # embed/unembed on the stored fp32 weights, evaluated in float64, against the float64 training graph
    dec, ref_model = Decoder(fw).double(), copy.deepcopy(m).double()
    eye, toks = torch.eye(d, dtype=torch.float64), torch.arange(V)
    with torch.no_grad():
        err = (dec.unembed(eye) @ dec.embed(toks) - ref_model.unembed(eye) @ ref_model.embed(toks)).abs()
    assert rep.interface_err_max == pytest.approx(err.max().item(), rel=1e-6)

    bound = interface_bound(fw)
    assert rep.interface_bound_max == pytest.approx(bound.max().item(), rel=1e-12)
    assert (err <= bound).all() and rep.interface_within_bound  # the bound holds, entry by entry

    kappa = 1.0
    if layout == "shared-z":
        L = m.pit.cholesky_factor().double()
        T, T_inv, Z = L @ L.T, torch.cholesky_inverse(L), m.pit.z.double()
        kappa = ((T.abs() @ Z.abs().T @ Z.abs() @ T_inv.abs()).max() / (T.abs() @ T_inv.abs()).max()).item()
    floor = 1 / ((4 * d + 8) * math.sqrt(V) * kappa * BOUND_SLACK)
    assert err.max().item() >= floor * bound.max().item(), (rep.cond_T, err.max().item() / bound.max().item(), floor)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), spread=st.floats(0.0, 1.0), layout=st.sampled_from(LAYOUTS))
def test_folded_logits_as_exact_as_training_graph(seed, spread, layout):
    """Distance to exact (float64) logits: folded fp32 <= 2 x the training graph's own fp32 error + a layout term.

    Layout term from forward error analysis of the head/embedding chain: sqrt(d) u kappa S, S the logit scale,
    kappa = 1 for untied (E and W rounded once), cond(T) for shared-z / shared-e (a d x d transform meets a table
    scaled by T^-1 or T). shared-e's head really does lose ~cond(T)^2 u relative accuracy: see the fold report."""
    m = random_pit(seed, spread=spread)
    fw, rep = fold(m, layout)
    toks = torch.randint(0, m.cfg.vocab_size, (1, m.cfg.max_seq_len), generator=torch.Generator().manual_seed(seed))
    exact = copy.deepcopy(m).double()(toks)[0]
    e_ref = (m(toks)[0].double() - exact).abs().max().item()
    e_fold = (Decoder(fw)(toks, torch.arange(toks.shape[1]))[0].double() - exact).abs().max().item()
    kappa = 1.0 if layout == "untied" else rep.cond_T
    tol = 2 * e_ref + math.sqrt(m.cfg.dim) * U32 * kappa * exact.abs().max().item()
    assert e_fold <= tol


@pytest.mark.parametrize("tying", ["tied", "untied"])
def test_baselines_fold_exactly(tying):
    """Tied/untied fold with T = I. A random model's greedy path is decided by near-ties (margins ~1e-6), so greedy
    agreement is checked on the trained models only; here the logits and interface gates apply."""
    m = random_pit(5, tying=tying)
    gates = {k: v for k, v in GATES["fp32"].items() if k != "greedy_agree"}
    for layout in layouts_for(tying):
        r = validate(
            ReferenceSession(m),
            FoldedSession(fold(m, layout)[0]),
            np.random.default_rng(0).integers(0, m.cfg.vocab_size, (2, 32)),
            gates=gates,
        )
        assert r.passed, r.failures()


def test_layout_refused_for_baseline():
    with pytest.raises(BadInput, match="shared-z"):
        fold(random_pit(0, tying="tied"), "shared-z")


@pytest.mark.parametrize("layout", ["untied", "shared-z"])
def test_default_model_meets_fp32_acceptance(pit_ckpt, heldout, layout):
    """Acceptance: held-out max |dlogit| <= 1e-4, top-1 100 %, |W E - I|max <= 1e-5, 64 greedy tokens identical."""
    fw, rep = fold(pit_ckpt, layout)
    r = validate(ReferenceSession(pit_ckpt.model), FoldedSession(fw), heldout, "fp32")
    assert r.passed, [(g.metric, g.value) for g in r.failures()]
    assert r.metrics["greedy_tokens"] == 64
    assert r.metrics["ppl_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert rep.interface_err_max <= 1e-5


def test_default_model_shared_e_is_cond_limited(pit_ckpt, heldout):
    """shared-e's head (h g T^2) E^T carries ~cond(T) u relative error from the fp32 table E = Z T^-1: on the default
    model (cond(T) ~ 78, logits up to ~20) that is ~1e-4, at the fp32 logit gate. Every other gate holds, and the
    logit error stays inside the forward-error bound sqrt(d) u cond(T) S (plus the training graph's own error)."""
    fw, rep = fold(pit_ckpt, "shared-e")
    r = validate(ReferenceSession(pit_ckpt.model), FoldedSession(fw), heldout, "fp32")
    failed = {g.metric for g in r.failures()}
    assert failed <= {"max_abs_logit"}, failed
    windows = eval_windows(heldout, ValidateConfig(), pit_ckpt.config.max_seq_len)  # the windows validate() scored
    with torch.no_grad():
        scale = pit_ckpt.model(torch.as_tensor(windows)).abs().max().item()
    bound = 1e-4 + math.sqrt(pit_ckpt.config.dim) * U32 * rep.cond_T * scale
    assert r.metrics["max_abs_logit"] <= bound
    assert r.metrics["top1"] == 1.0 and r.metrics["greedy_agree"] == 1.0
    assert rep.warnings == [] or "shared-e" in rep.warnings[0]


def test_shared_layouts_store_one_table(pit_ckpt):
    V, d = pit_ckpt.config.vocab_size, pit_ckpt.config.dim
    sizes = {lay: fold(pit_ckpt, lay)[1] for lay in LAYOUTS}
    assert sizes["untied"].table_params == 2 * V * d
    assert sizes["shared-z"].table_params == V * d and sizes["shared-z"].transform_params == 2 * d * d
    assert sizes["shared-e"].table_params == V * d and sizes["shared-e"].transform_params == d * d


def test_decode_matches_prefill(pit_ckpt, heldout):
    """KV cache: prefill of n tokens == prefill of k then n-k single-token decodes (same positions)."""
    s = FoldedSession(fold(pit_ckpt, "shared-z")[0])
    w = heldout[0, :24]
    full = s.prefill(w, 0)
    s.reset()
    part = [s.prefill(w[:10], 0)] + [s.decode(int(t), 10 + i)[None] for i, t in enumerate(w[10:])]
    np.testing.assert_allclose(np.concatenate(part), full, rtol=0, atol=1e-4)


def test_recorded_reference_outlives_the_model(heldout):
    """validate() compares against a recording of the training graph: the model can be dropped before an artifact
    is opened (what keeps `pit-export validate` within memory at scale) and the verdict is the one the live model
    gives."""
    import gc
    import sys
    import types
    import weakref

    from pit_export.models.checkpoint import load_checkpoint

    from pit_export.validate import Reference

    from .conftest import DEFAULT_MODEL

    ck = load_checkpoint(DEFAULT_MODEL)
    fw = fold(ck, "shared-z")[0]
    cfg = ValidateConfig(n_windows=2, n_greedy=16)
    live = validate(ReferenceSession(ck.model), FoldedSession(fw), heldout, "fp32", cfg)
    ref = Reference(ReferenceSession(ck.model), heldout, cfg, ck.config.max_seq_len)
    # the kept tables are copies: a view would pin the checkpoint's whole (memory-mapped) storage, every weight
    kept_model = interface_model(ck.model, dtype=torch.float32)
    model_storages = {p.untyped_storage().data_ptr() for p in ck.model.parameters()}
    kept = [
        p for name in INTERFACE_PARAMS if name in kept_model._modules for p in kept_model._modules[name].parameters()
    ]
    assert kept and not model_storages & {p.untyped_storage().data_ptr() for p in kept}
    model, ck.model = weakref.ref(ck.model), None
    gc.collect()
    assert model() is None
    # nothing vocabulary-sized stays in memory with the recording: logits and tables wait in its files (the walk
    # stops at modules' globals, which reach everything the test session holds)
    V, todo, big = ck.config.vocab_size, [ref], []
    seen = {id(vars(m)) for m in list(sys.modules.values()) if m is not None and hasattr(m, "__dict__")}
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, type | types.ModuleType):
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor | np.ndarray) and V in o.shape:
            big.append(tuple(o.shape))
        todo += gc.get_referents(o)
    assert not big
    recorded = validate(ref, FoldedSession(fw), scheme="fp32", cfg=cfg)
    ref.close()
    assert recorded.metrics == live.metrics and recorded.passed

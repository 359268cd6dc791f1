"""Calibrated rounding (pit_export/calibrate.py): exact algebra before rounding, and codes on each backend's own grid.

Every check runs the real toolchain's quantizer (onnxruntime's MatMulNBits quantizer and runtime, torchao's
quantize_, coremltools' compression and the saved MIL program); tolerances come from fp32 / fp16 storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pit_export import calibrate as C
from pit_export.decoder import Decoder, FoldedWeights
from pit_export.errors import BadInput
from pit_export.fold import fold
from pit_export.quantize import ONNX_SYMMETRIC, gate_key, get_scheme, rounding_name

from .conftest import random_pit

BACKENDS = ("onnx", "coreml", "executorch")


def spd(d: int, seed: int, cond: float = 1e3) -> torch.Tensor:
    """A random SPD matrix with eigenvalues spread log-uniformly over [1, cond]: strongly correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    ev = torch.logspace(0, np.log10(cond), d, dtype=torch.float64)
    return (q * ev) @ q.T


def table(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    w[0, :32] = w[0, :32].abs()  # groups of one sign (asymmetric grids clamp their range at 0)
    w[1, :32] = -w[1, :32].abs()
    w[2, :32] = 0  # an all-zero group
    return w


def ort_dequantized(w: torch.Tensor, bits: int = 4) -> np.ndarray:
    """What onnxruntime computes from w [N, K] as a MatMul weight quantized by its MatMulNBits quantizer (x @ w^T with
    x = I_K through the runtime)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    n, k = w.shape
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [k, n])],
        [numpy_helper.from_array(w.numpy().T.copy(), "w")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    q = MatMulNBitsQuantizer(m, bits, 32, is_symmetric=ONNX_SYMMETRIC)  # as export/onnx.py quantizes
    q.process()
    sess = ort.InferenceSession(q.model.model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.eye(k, dtype=np.float32)})[0].T


def torchao_dequantized(w: torch.Tensor, embedding: bool) -> torch.Tensor:
    """What pit_export.export.executorch.quantize stores for w as a linear (8da4w) or as an embedding (emb4)."""
    from torch import nn

    from pit_export.export.executorch import quantize

    mod = nn.Embedding(*w.shape) if embedding else nn.Linear(w.shape[1], w.shape[0], bias=False)
    mod.weight = nn.Parameter(w.clone(), requires_grad=False)
    holder = nn.ModuleDict({"m": mod})
    quantize(holder, get_scheme("8da4w", 4) if embedding else get_scheme("8da4w"))
    return holder["m"].weight.dequantize().double()


# ---------------------------------------------------------------- the backends' own grids


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([4, 8]))
def test_onnx_grid_is_onnxruntimes(seed, bits):
    """calibrate's formula for the MatMulNBits quantizer is the one onnxruntime applies (same dequantized weights,
    bit for bit), and a GPTQ table handed to it comes back with exactly GPTQ's values."""
    w = table(24, 96, seed)
    assert np.array_equal(C.rtn(w, "onnx", bits).float().numpy(), ort_dequantized(w, bits))
    handed, deployed = C.gptq(w, spd(96, seed), C.grid_params(w, "onnx", bits))
    np.testing.assert_allclose(ort_dequantized(handed.float(), bits), deployed.numpy(), rtol=1e-6, atol=1e-7)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_torchao_grid_is_the_executorch_exporters(seed):
    """The exporter's own torchao recipes (8da4w linear, 4-bit embedding) store GPTQ's values for a handed table, and
    both read it on the same grid (so one shared table serves the gather and the head)."""
    w = table(16, 64, seed)
    handed, deployed = C.gptq(w, spd(64, seed), C.grid_params(w, "executorch"))
    for embedding in (False, True):
        torch.testing.assert_close(torchao_dequantized(w, embedding), C.rtn(w, "executorch"), rtol=2**-23, atol=0)
        torch.testing.assert_close(torchao_dequantized(handed.float(), embedding), deployed, rtol=1e-6, atol=1e-7)


def test_coreml_grid_is_the_saved_programs(tmp_path):
    """What a compressed CoreML function stores (constexpr_blockwise_shift_scale, expanded by the MIL reader) is
    calibrate's deployed weight, to fp16 rounding of scale x code: the shared table (int4, blocks of 32, one const for
    the gather and the matmul) and, under calibrated rounding, the d x d head transform (int8, blocks of 32)."""
    from pit_export.runtimes.milnumpy import load_program

    from pit_export.export.coreml import write_function

    m = random_pit(3, dim=64, vocab=256, layers=1)
    fw, _ = fold(m, "shared-z")
    deployed = {}
    for name, bits in (("table.weight", 4), ("head_proj.weight", 8)):
        w = fw.tensors[name]
        group = C.group_of(bits, w)
        handed, deployed[name] = C.gptq(w, spd(64, 3), C.grid_params(w, "coreml", bits, group))
        fw.tensors[name] = handed.float()
        assert torch.equal(C.rtn(fw.tensors[name], "coreml", bits, group), deployed[name])
    dest = tmp_path / "unembed.mlpackage"
    write_function(fw, "unembed", get_scheme("int4+gptq-all"), dest)
    fn = next(iter(load_program(dest).values()))
    consts = fn.consts
    assert fn.expanded.count("constexpr_blockwise_shift_scale") == 2  # the table and the head transform, compressed
    for name in deployed:
        want = deployed[name].numpy()
        stored = [np.asarray(v, np.float64) for v in consts.values() if np.ndim(v) == 2]
        # a weight is stored as the traced Linear's or its transpose
        stored = [x for s in stored for x in (s, s.T) if x.shape == want.shape]
        assert any(np.abs(x - want).max() <= 2**-10 * np.abs(want).max() for x in stored), name


# ---------------------------------------------------------------- GPTQ itself


@pytest.mark.parametrize("backend", BACKENDS)
def test_gptq_with_uncorrelated_inputs_is_round_to_nearest(backend):
    """H diagonal: no error feedback between columns, so GPTQ picks RTN's codes, except where RTN's value lies outside
    the group's range (an asymmetric grid's end code past max(0, max w)): there the hand-off takes the code inside."""
    w = table(32, 64, 1).half().float()  # fp16-exact, as CoreML sees it
    H = torch.diag(torch.rand(64, dtype=torch.float64) + 0.5)
    grid = C.grid_params(w, backend)
    _, deployed = C.gptq(w, H, grid, damp=0.0)
    r = C.rtn(w, backend)
    g = w.double().reshape(32, 2, 32)
    asym = backend == "onnx" and not ONNX_SYMMETRIC
    lo = (g.min(-1).values.clamp(max=0) if asym else -g.abs().max(-1).values).repeat_interleave(32, 1)
    hi = (g.max(-1).values.clamp(min=0) if asym else g.abs().max(-1).values).repeat_interleave(32, 1)
    inside = grid.fixed | ((r >= lo) & (r <= hi))
    assert inside.float().mean() > 0.95
    same = deployed[inside] == r[inside]
    assert same.float().mean() > 0.999  # CoreML divides in fp16: a value within fp16 rounding of k + 1/2 may differ
    assert ((deployed - r).abs()[~inside] <= grid.expand(grid.scale)[~inside] * (1 + 1e-9)).all()  # one code away


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_beats_round_to_nearest_on_its_objective(backend, seed):
    """On correlated inputs, tr(dW H dW^T) of GPTQ's rounding is well below RTN's (the reason it exists); the fixed
    elements keep their values and every other lies inside its group's range."""
    w = table(64, 128, seed)
    H = spd(128, seed)
    grid = C.grid_params(w, backend)
    handed, deployed = C.gptq(w, H, grid, damp=0.0)
    assert C._proxy(w, deployed, H) < 0.7 * C._proxy(w, C.rtn(w, backend), H)
    fixed = grid.fixed
    w64 = w.double() if backend != "coreml" else w.half().double()  # CoreML quantizes the fp16 program's weights
    assert torch.equal(handed[fixed], w.double()[fixed])
    g = (handed if backend != "coreml" else handed.half().double()).reshape(64, 4, 32)
    ref = w64.reshape(64, 4, 32)
    if backend == "onnx" and not ONNX_SYMMETRIC:
        assert (g.min(-1).values >= ref.min(-1).values.clamp(max=0) - 1e-6).all()
        assert (g.max(-1).values <= ref.max(-1).values.clamp(min=0) + 1e-6).all()
    else:
        assert (g.abs().max(-1).values <= ref.abs().max(-1).values * (1 + 1e-6)).all()


def fine_grid(w: torch.Tensor, step: float = 2.0**-40) -> C.Grid:
    """A grid so fine that rounding vanishes (a step of 2^-40, codes unbounded, nothing fixed)."""
    R, Cn = w.shape
    ones = torch.ones(R, Cn // 32, dtype=torch.float64)
    return C.Grid(
        step * ones,
        0 * ones,
        -(2.0**60) * ones,
        2.0**60 * ones,
        torch.zeros(R, Cn, dtype=torch.bool),
        0 * w.double(),
        32,
    )


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_blocks_and_column_order_change_nothing_but_the_order(act_order):
    """The lazy block update is the column-by-column algorithm: any block size gives the same codes (up to a code
    that floating-point summation order moves across a rounding boundary)."""
    w, H = table(24, 96, 4), spd(96, 4)
    grid = C.grid_params(w, "onnx")
    ref = C.gptq(w, H, grid, act_order=act_order, block=96)[1]
    for block in (1, 7, 32):
        assert (C.gptq(w, H, grid, act_order=act_order, block=block)[1] != ref).float().mean() < 0.005


# ---------------------------------------------------------------- the objective's algebra, exact in float64


def sq_logit_diff(a: Decoder, b: Decoder, windows: torch.Tensor, mean: bool = False) -> float:
    """Sum over windows of the squared logit differences of two Decoders on a prefill of each window (the per-window
    mean of the squares with mean=True)."""
    total = 0.0
    with torch.no_grad():
        for w in windows:
            a.reset_cache()
            b.reset_cache()
            pos = torch.arange(len(w))
            d2 = (a(w[None], pos) - b(w[None], pos)) ** 2
            total += (d2.mean() if mean else d2.sum()).item()
    return total


def _windows(vocab: int, n: int = 3, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), layout=st.sampled_from(["shared-z", "untied", "shared-e"]))
def test_head_objective_is_the_logit_error(seed, layout):
    """For a perturbation D of the table the head reads (random PIT model, float64), the head's logits move by x D^T
    with x the input collect() records, so sum_n |dlogits_n|^2 = tr(D H_head D^T) exactly (up to fp64 rounding)."""
    m = random_pit(seed % 7, dim=32, vocab=128, layers=1)
    fw, _ = fold(m, layout)
    fw64 = FoldedWeights(fw.cfg, fw.layout, {k: v.double() for k, v in fw.tensors.items()})
    dec = Decoder(fw64).double()
    win = _windows(128, seed=seed)
    stats = C.collect(dec, None, win, set())
    key = "output.weight" if layout == "untied" else "table.weight"
    D = torch.randn(fw.tensors[key].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1e-3
    fw2 = FoldedWeights(fw.cfg, layout, {**fw64.tensors, key: fw64.tensors[key] + D})
    dec2 = Decoder(fw2).double()
    dec2.embed = dec.embed  # the head alone reads the perturbed table
    lhs = sq_logit_diff(dec2, dec, win)
    rhs = torch.einsum("ij,jk,ik->", D, stats.grams["head"], D).item()
    assert abs(lhs - rhs) <= 1e-9 * rhs


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), layout=st.sampled_from(["shared-z", "untied", "shared-e"]))
def test_embedding_error_goes_through_the_layouts_map(seed, layout):
    """A perturbation D of the gathered table moves the embedding by D[t] P, with P the map calibrate.hessian puts
    around the embedding's Fisher (T^-1 in shared-z, I otherwise), exactly in float64."""
    m = random_pit(seed % 7, dim=32, vocab=128, layers=1)
    fw, _ = fold(m, layout)
    fw64 = FoldedWeights(fw.cfg, fw.layout, {k: v.double() for k, v in fw.tensors.items()})
    key = "tok_embeddings.weight" if layout == "untied" else "table.weight"
    D = torch.randn(fw.tensors[key].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    fw2 = FoldedWeights(fw.cfg, layout, {**fw64.tensors, key: fw64.tensors[key] + D})
    t = torch.arange(128)
    with torch.no_grad():
        de = Decoder(fw2).double().embed(t) - Decoder(fw64).double().embed(t)
    P = fw64.tensors["embed_proj.weight"].T if layout == "shared-z" else torch.eye(32, dtype=torch.float64)
    torch.testing.assert_close(de, D @ P, rtol=1e-12, atol=1e-12)
    # and the shared-z map is T^-1 of the training graph: z_t P is the reference embedding
    if layout == "shared-z":
        with torch.no_grad():
            ref = m.double().embed(t)
        tol = 2**-22 * float(torch.linalg.cond(P)) * float(ref.abs().max())  # P is stored in fp32
        torch.testing.assert_close(fw64.tensors["table.weight"][t] @ P, ref, rtol=0, atol=tol)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), layout=st.sampled_from(["shared-z", "untied", "shared-e"]))
def test_calibration_before_rounding_changes_no_logit(seed, layout):
    """The whole transformation (statistics from the model, each weight's H, GPTQ's ordered error feedback, the
    hand-off) with rounding taken away (a grid of step 2^-40): every weight, and so every logit of a random PIT model,
    is unchanged to float64 rounding."""
    m = random_pit(seed % 7, dim=64, vocab=128, layers=1)
    fw, _ = fold(m, layout)
    fw64 = FoldedWeights(fw.cfg, fw.layout, {k: v.double() for k, v in fw.tensors.items()})
    dec = Decoder(fw64).double()
    names = set(C.quantized_weights(fw, get_scheme("int4+gptq-all"), "onnx", "all"))
    stats = C.collect(dec, m.double(), _windows(128, seed=seed), names)
    out = dict(fw64.tensors)
    for name in names:
        H = C.hessian(name, fw64, stats)
        assert torch.allclose(H, H.T) and torch.linalg.eigvalsh(H).min() > -1e-9 * H.diag().max()
        w = fw64.tensors[name]
        handed, deployed = C.gptq(w, H, fine_grid(w), damp=0.01)
        # each step rounds by <= 2^-41; the feedback of those errors stays at float64-rounding size
        assert (deployed - w).abs().max() <= 1e-9 * w.abs().max() and torch.equal(handed, deployed)
        out[name] = deployed
    w = _windows(128, n=1, seed=seed + 1)[0]
    with torch.no_grad():
        a = dec(w[None], torch.arange(len(w)))
        b = Decoder(FoldedWeights(fw.cfg, layout, out)).double()(w[None], torch.arange(len(w)))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9 * float(a.abs().max()))


@pytest.mark.parametrize("backend", ["onnx", "coreml"])
def test_rounded_gram_is_the_rounded_tables_gram_by_chunks(backend, monkeypatch):
    """The re-fit reads R^T R of the rounded table computed ROW_CHUNK rows at a time (here 64 rows, 5 chunks, the last
    partial): the whole table's rtn, its gram, to float64 rounding (sums of 300 products of magnitude <= max|w|^2)."""
    monkeypatch.setattr(C, "ROW_CHUNK", 64)
    w = torch.randn(300, 96, generator=torch.Generator().manual_seed(0))
    r = C.rtn(w, backend)
    want = r.T @ r
    got = C.rounded_gram(w, backend, 4, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=300 * 2**-52 * float(r.abs().max()) ** 2 * 4)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16), backend=st.sampled_from(["coreml", "executorch"]))
def test_refit_embedding_map_makes_the_rounded_interface_exact(seed, backend):
    """shared-z with float d x d transforms: after the table is rounded, the re-fit map P = (A Z^T Z^)^-1 diag(g)
    gives W E = I through the Decoder's own unembed/embed (float64), where the fold's T^-1 leaves the rounding's
    error; with the unrounded table the re-fit map is the fold's T^-1."""
    from pit_export.fold import interface_matrices

    m = random_pit(seed % 7, dim=64, vocab=256, layers=1, spread=0.5)
    fw, _ = fold(m, "shared-z")
    fw64 = FoldedWeights(fw.cfg, fw.layout, {k: v.double() for k, v in fw.tensors.items()})
    P0 = C.exact_embed_proj(fw64, fw64.tensors["table.weight"])
    scale = float(torch.linalg.cond(P0))
    torch.testing.assert_close(P0, fw64.tensors["embed_proj.weight"], rtol=0, atol=2**-20 * scale * P0.abs().max())
    zq = C.rtn(fw.tensors["table.weight"], backend)
    eye = torch.eye(64, dtype=torch.float64)
    before = FoldedWeights(fw.cfg, fw.layout, {**fw64.tensors, "table.weight": zq})
    after = FoldedWeights(fw.cfg, fw.layout, {**before.tensors, "embed_proj.weight": C.exact_embed_proj(fw64, zq)})
    W0, E0 = interface_matrices(Decoder(before).double())
    W1, E1 = interface_matrices(Decoder(after).double())
    assert (W1 @ E1 - eye).abs().max() < 1e-10 < 1e-4 < (W0 @ E0 - eye).abs().max()


def test_calibration_reduces_the_error_of_a_random_pit_model():
    """GPTQ against RTN on a random PIT model's shared table (ONNX grid), on held-apart windows: the logits' mean
    squared error falls."""
    m = random_pit(1, dim=64, vocab=256, layers=1, spread=0.6)
    fw, _ = fold(m, "shared-z")
    out, _ = C.apply(fw, m, None, get_scheme("int4+gptq"), "onnx", windows=_windows(256, n=8, length=32, seed=5))
    test = _windows(256, n=4, length=32, seed=99)

    def mse(tensors):
        q = {**fw.tensors, "table.weight": C.rtn(tensors["table.weight"], "onnx").float()}
        return sq_logit_diff(Decoder(fw), Decoder(FoldedWeights(fw.cfg, fw.layout, q)), test, mean=True)

    assert mse(out.tensors) < mse(fw.tensors)


# ---------------------------------------------------------------- scheme names, data


def test_rounding_is_an_option_of_the_scheme_not_its_name():
    """8da4w+gptq-all is the 8da4w format (its gates, its name in the manifest) rounded by GPTQ; an explicit rounding
    wins over the suffix; rounding needs a 4-bit weight."""
    s = get_scheme("8da4w+gptq-all", 4)
    assert (s.name, s.calibration, s.embedding_bits, rounding_name(s)) == ("8da4w+emb4", "all", 4, "gptq-all")
    assert get_scheme("8da4w+emb4+gptq-all") == s and gate_key(s.name) == "8da4w"
    assert get_scheme("int4+gptq").calibration == "table"
    assert get_scheme("int4+gptq", rounding="rtn").calibration is None
    assert get_scheme("int8", 4, "gptq").calibration == "table"  # the 4-bit embedding is there to round
    bad_ones = (("int4+gptq2", {}), ("int8+gptq", {}), ("fp32", {"rounding": "gptq-all"}), ("int4", {"rounding": "x"}))
    bad_ones += (("palettize4+gptq", {}),)  # k-means lookup tables: no grid to hand GPTQ's codes to
    for bad, kw in bad_ones:
        with pytest.raises(BadInput):
            get_scheme(bad, **kw)


def test_calibration_windows_come_from_the_training_split(pit_ckpt):
    """Calibration text is the training split: no held-out document (the split validation scores) is among it."""
    from pit_export.models.corpus import build_corpus, load_heldout

    train, _ = build_corpus(max_train_bytes=C.CalibrationConfig.train_bytes, max_heldout_bytes=0)
    starts = {d[:300] for d in load_heldout()}
    assert train and not any(d[:300] in starts for d in train)
    w = C.calibration_windows(pit_ckpt.tokenizer, pit_ckpt.config, 4, 64, 200_000)
    assert w.shape == (4, 64) and int(w.max()) < pit_ckpt.config.vocab_size


@pytest.mark.slow
def test_onnx_preset_rounds_on_the_grid_and_beats_round_to_nearest(pit_ckpt, heldout, tmp_path):
    """The onnx-cpu preset calibrates (GPTQ, every 4-bit weight): its manifest says so, no weight left the backend's
    grid, and through onnxruntime its KL to the training graph is below the round-to-nearest artifact's."""
    from pit_export.runtimes import open_session
    from pit_export.runtimes.pytorch import ReferenceSession

    from pit_export.export import export_artifact
    from pit_export.validate import validate

    man = export_artifact(pit_ckpt, "onnx-cpu", tmp_path / "gptq")
    assert man["rounding"] == "gptq-all" and man["scheme"] == "8da4w"
    assert man["calibration"]["calibration"]["split"] == "train"
    assert all(w["off_grid"] == 0 for w in man["calibration"]["weights"].values())
    export_artifact(pit_ckpt, "onnx-cpu", tmp_path / "rtn", rounding="rtn")
    ref = ReferenceSession(pit_ckpt.model, threads=2)
    kl = {}
    for name in ("gptq", "rtn"):
        sess = open_session(tmp_path / name, threads=2)
        kl[name] = validate(ref, sess, heldout, sess.scheme).metrics["kl_mean"]
        sess.close()
    assert kl["gptq"] < 0.7 * kl["rtn"], kl


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16), layout=st.sampled_from(["shared-z", "untied"]))
def test_layerwise_statistics_are_the_full_forwards(seed, layout):
    """layer_stats (windows run layer by layer, one layer's grams alive at a time) records, for every linear, the
    second moment of the input that linear sees in the Decoder's own forward (float64, to rounding); linears that read
    one tensor (wq/wk/wv, w1/w3) share one gram."""
    m = random_pit(seed % 7, dim=32, vocab=128, layers=2)
    fw, _ = fold(m, layout)
    fw64 = FoldedWeights(fw.cfg, fw.layout, {k: v.double() for k, v in fw.tensors.items()})
    dec = Decoder(fw64).double()
    win = _windows(128, seed=seed)
    names = {k for k in fw64.tensors if k.startswith("layers.") and fw64.tensors[k].dim() == 2}
    want: dict = {}
    hooks = [
        mod.register_forward_hook(lambda mod_, i, o, k=f"{n}.weight": C._add(want, k, i[0]))
        for n, mod in dec.named_modules()
        if isinstance(mod, torch.nn.Linear) and f"{n}.weight" in names
    ]
    with torch.no_grad():
        for w in win:
            dec.reset_cache()
            dec(w[None], torch.arange(len(w)))
    for h in hooks:
        h.remove()
    got = C.collect(dec, None, win, names)
    assert len({C.gram_key(n) for n in names}) == 4 * 2  # wq (k, v), wo, w1 (w3), w2 per layer
    for name in names:
        torch.testing.assert_close(
            got.grams[C.gram_key(name)], want[name], rtol=1e-12, atol=1e-12 * want[name].abs().max()
        )


@pytest.mark.parametrize("layout", ["untied", "shared-z"])
def test_rounding_in_place_is_rounding_a_copy(layout):
    """inplace=True (an export's own fold) overwrites the tables the fold computed, and gives the same weights as the
    copying path; the model's own tensors are never written."""
    m = random_pit(2, dim=64, vocab=256, layers=1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sch = get_scheme("8da4w+gptq-all", 4)
    win = _windows(256, n=2, length=32)
    fw_copy, _ = fold(m, layout)
    want, _ = C.apply(fw_copy, m, None, sch, "executorch", windows=win)
    fw, _ = fold(m, layout)
    got, _ = C.apply(fw, m, None, sch, "executorch", windows=win, inplace=True)
    for k in want.tensors:
        assert torch.equal(got.tensors[k], want.tensors[k]), k
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    own = [
        k
        for k in C.TABLES
        if k in fw.tensors
        and fw.tensors[k].untyped_storage().data_ptr()
        not in {v.untyped_storage().data_ptr() for v in m.state_dict().values()}
    ]
    assert own or layout != "untied"  # untied: both tables are the fold's own
    for k in own:  # written where it was
        assert got.tensors[k].data_ptr() == fw.tensors[k].data_ptr() and not torch.equal(
            fw.tensors[k], fw_copy.tensors[k]
        )

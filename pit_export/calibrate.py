"""Calibrated rounding (GPTQ) of the folded weights, on each backend's own quantization grid.

Backends quantize by rounding each weight to nearest (RTN). GPTQ picks the rounding of a weight matrix W (rows =
outputs, columns = inputs, groups of `group` columns per scale) one column at a time and spreads each column's error
over the columns still to come, weighted by the second moment H of the matrix's inputs, so that X W_q^T stays close
to X W^T where the inputs X actually live. For the PIT table Z the head reads Z after diag(g) T (cond(T) ~ 78 on the
default model): errors along T's large directions cost the most, and RTN ignores that.

The result reaches every backend without touching its quantizer: the table handed to the backend lies on that
backend's grid. In each group, the elements that set the group's parameters (the abs-max for symmetric grids; min and
max for asymmetric ones) keep their values, and every other element is moved to a grid point k*s inside the group's
range, so the backend's own RTN recomputes the same scale (and zero point) and reproduces the chosen codes exactly.
`grid_params` states, per backend, the formula its quantizer uses (checked against the toolchain in the tests).

The objective of a V x d table counts both of its uses, in the same (loss) units:
  head       logits_v = x . z_v               H_head = sum_n x_n x_n^T   (x: the head's input, after diag(g) T)
  embedding  e_t = z_t P (P = T^-1 in shared-z)  H_emb = sum_n P g_n g_n^T P^T  (g_n = dLoss/de at position n)
The head's term is the diagonal Fisher of the logits averaged over rows (sum_v p_v = 1); the embedding's is the
empirical Fisher of the embedding output averaged over rows. Body linears use H = sum x x^T of their inputs.

Statistics come from the fp32 folded model on windows of the *training* split (models/corpus.py): the held-out split
that validation scores is never read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pit_export.decoder import Decoder, FoldedWeights
from pit_export.errors import BadInput
from pit_export.quantize import ONNX_SYMMETRIC

TABLES = ("table.weight", "tok_embeddings.weight", "output.weight")
TRANSFORMS = ("head_proj.weight", "embed_proj.weight")
MODES = ("table", "all")  # what GPTQ rounds: the V x d tables only, or every 4-bit weight


@dataclass(frozen=True)
class CalibrationConfig:
    mode: str = "table"  # "table" | "all"
    n_windows: int = 64  # 32 -> 64: KL -4 % (PIT), -1 % (tied) on pit-tiny's onnx-cpu preset; 128: no gain
    window_len: int = 256  # capped at the model's context
    damp: float = 0.01  # ridge on H, relative to its mean diagonal
    act_order: bool = True  # columns in decreasing H_jj (the groups' scales stay those of the original weights)
    embedding_weight: float = 1.0  # weight of the embedding's term in a table's H (0: the head's only)
    train_bytes: int = 1_000_000  # training-split text (documents spread over the split) the windows are cut from


# ---------------------------------------------------------------- grids: what each backend's RTN does


@dataclass
class Grid:
    """Per row and group: value(k) = (k - zero) * scale. Free elements take codes in [lo, hi] (inside the range that
    set the group's parameters); fixed elements keep their value, whose deployed value is `fixed_value`."""

    scale: torch.Tensor  # [R, G] float64
    zero: torch.Tensor  # [R, G]
    lo: torch.Tensor  # [R, G] lowest allowed code for a free element
    hi: torch.Tensor  # [R, G]
    fixed: torch.Tensor  # [R, C] bool
    fixed_value: torch.Tensor  # [R, C] float64, the backend's RTN value of every element (kept where fixed)
    group: int

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.group, dim=1)


def rtn(w: torch.Tensor, backend: str, bits: int = 4, group: int = 32) -> torch.Tensor:
    """What `backend`'s own quantizer makes of w [R, C] (groups of `group` along C), dequantized, float64."""
    q, scale, zero = _backend_codes(w, backend, bits, group)
    return ((q - zero.repeat_interleave(group, 1)) * scale.repeat_interleave(group, 1)).double()


def _roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (numpy rounds them to even)."""
    t = np.trunc(x)
    return np.where(np.abs(x - t) >= 0.5, t + np.sign(x), t)


def _backend_codes(w: torch.Tensor, backend: str, bits: int, group: int):
    """(codes [R, C], scale [R, G], zero [R, G]) as `backend` computes them, all float64."""
    R, C = w.shape
    if C % group:
        raise BadInput(f"calibrated rounding: {C} columns are not a multiple of the group size {group}")
    if backend == "onnx":  # MatMulNBitsQuantizer (MLAS blockwise), in float32, roundf = halves away from zero
        g = w.detach().float().numpy().reshape(R, C // group, group)
        qmax = 2**bits - 1
        if ONNX_SYMMETRIC:  # the signed extreme e sets s = e / -2^(b-1); code = roundf(v / s + 2^(b-1)) (e -> code 0)
            mid = np.float32(2 ** (bits - 1))
            mn, mx = g.min(-1), g.max(-1)
            s = (np.where(np.abs(mx) > np.abs(mn), mx, mn) / -mid).astype(np.float32)
            zp = np.full(s.shape, mid, dtype=np.float32)
        else:  # range [min(0, lo), max(0, hi)]: s = range / (2^b - 1), zp = roundf(-lo / s)
            lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
            s = ((hi - lo) / np.float32(qmax)).astype(np.float32)
            zp = np.clip(_roundf((-lo / np.where(s == 0, np.float32(1), s)).astype(np.float32)), 0, qmax)
            zp = zp.astype(np.float32)
        safe = np.where(s == 0, np.float32(1), s)
        # code = roundf(v * (1 / s) + zp) (a separate round of v / s missed 2 of 690 000 ties in the grid test)
        rs = np.where(s == 0, np.float32(0), np.float32(1) / safe).astype(np.float32)
        q = np.clip(_roundf((g * rs[..., None] + zp[..., None]).astype(np.float32)), 0, qmax)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).double()  # noqa: E731
        return t(q.reshape(R, C)), t(s), t(zp)
    if backend == "coreml":  # coremltools linear_symmetric, signed: [-(2^(b-1) - 1), 2^(b-1) - 1], on fp16 weights
        from coremltools.optimize._utils import compute_qparams

        w16 = w.detach().to(torch.float16).numpy()
        q, s, _ = compute_qparams(w16, bits, True, "LINEAR_SYMMETRIC", np.int8, [1, group])
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))  # noqa: E731
        s = t(np.asarray(s, dtype=np.float32).reshape(R, C // group))
        return t(q.reshape(R, C)), s, torch.zeros_like(s)
    if backend == "executorch":  # torchao IntxWeightOnly / Int8DynamicActivationIntxWeight, symmetric PerGroup
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup, quantize_

        lin = nn.Sequential(nn.Linear(C, R, bias=False, device="meta"))
        lin[0].weight = nn.Parameter(w.detach().float().clone(), requires_grad=False)
        cfg = Int8DynamicActivationIntxWeightConfig(
            weight_dtype=getattr(torch, f"int{bits}"), weight_granularity=PerGroup(group)
        )
        quantize_(lin, cfg)
        qw = lin[0].weight
        return qw.qdata.double(), qw.scale.double().reshape(R, -1), qw.zero_point.double().reshape(R, -1)
    raise BadInput(f"calibrated rounding: no grid for backend {backend!r}")


def grid_params(w: torch.Tensor, backend: str, bits: int = 4, group: int = 32) -> Grid:
    """The backend's grid for w, and which elements must keep their values so that its RTN keeps that grid."""
    R, C = w.shape
    q, scale, zero = _backend_codes(w, backend, bits, group)
    w64 = w.detach().double()
    if backend == "coreml":
        w64 = w.detach().to(torch.float16).double()
    g = w64.reshape(R, C // group, group)
    if backend == "onnx" and ONNX_SYMMETRIC:  # the signed extreme sets the scale; every code lies within |extreme|
        mx, mn = g.max(-1).values, g.min(-1).values
        fixed = g == torch.where(mx.abs() > mn.abs(), mx, mn)[..., None]
        vmin = vmax = None
        qmin, qmax = 0, 2**bits - 1
    elif backend == "onnx":  # asymmetric: the group's min and max (0 included in the range) set scale and zero point
        vmin, vmax = g.min(-1).values.clamp(max=0), g.max(-1).values.clamp(min=0)
        fixed = (g == g.min(-1, keepdim=True).values) | (g == g.max(-1, keepdim=True).values)
        qmin, qmax = 0, 2**bits - 1
    else:  # symmetric: the abs-max sets the scale
        amax = g.abs().max(-1).values
        vmin, vmax = -amax, amax
        fixed = g.abs() == amax[..., None]
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax - 1 if backend == "executorch" else -qmax  # torchao [-8, 7] (scale amax / 7.5); CoreML [-7, 7]
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    eps = 1e-4  # a grid point may touch the range's end: it then ties the extreme, which changes nothing
    if vmin is None:
        lo, hi = torch.full_like(scale, qmin), torch.full_like(scale, qmax)
    else:
        lo = torch.ceil(vmin / safe + zero - eps).clamp(min=qmin)
        hi = torch.floor(vmax / safe + zero + eps).clamp(max=qmax)
    degenerate = scale == 0  # an all-zero group: everything stays
    fixed = fixed.reshape(R, C) | degenerate.repeat_interleave(group, 1)
    fixed_value = (q - zero.repeat_interleave(group, 1)) * scale.repeat_interleave(group, 1)
    return Grid(scale, zero, lo, hi, fixed, fixed_value, group)


# ---------------------------------------------------------------- GPTQ


def error_feedback(H: torch.Tensor, damp: float = 0.01, act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, perm): the column order (decreasing H_jj with act_order) and the upper Cholesky factor of the damped H^-1 in
    that order, whose row j holds the error-feedback weights of column j on the columns after it. Shared by all rows."""
    H = H.detach().double().clone()
    C = len(H)
    dead = torch.diag(H) <= 0
    H[dead, dead] = 1.0
    H += damp * torch.diag(H).mean() * torch.eye(C, dtype=torch.float64)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(C)
    H = H[perm][:, perm]
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True), perm


def gptq(
    w: torch.Tensor,
    H: torch.Tensor | None,
    grid: Grid,
    damp: float = 0.01,
    act_order: bool = True,
    block: int = 128,
    feedback: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """(handed, deployed): the table to give the backend (fixed elements unchanged, the others on the grid) and what
    the backend will compute from it, both float64 [R, C]. H [C, C] is the input second moment (or `feedback`, its
    error_feedback, computed once for many row chunks). Rows are independent: a table may be rounded in row chunks."""
    R, C = w.shape
    U, perm = feedback if feedback is not None else error_feedback(H, damp, act_order)
    inv = torch.argsort(perm)
    W = w.detach().double()[:, perm]
    scale, zero = grid.expand(grid.scale)[:, perm], grid.expand(grid.zero)[:, perm]
    lo, hi = grid.expand(grid.lo)[:, perm], grid.expand(grid.hi)[:, perm]
    fixed, fixed_value = grid.fixed[:, perm], grid.fixed_value[:, perm]
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    Q = torch.empty_like(W)
    for b0 in range(0, C, block):
        b1 = min(C, b0 + block)
        Wb, Ub, Err = W[:, b0:b1].clone(), U[b0:b1, b0:b1], torch.empty(R, b1 - b0, dtype=torch.float64)
        for j in range(b1 - b0):
            c = b0 + j
            col = Wb[:, j]
            k = torch.clamp(torch.round(col / safe[:, c] + zero[:, c]), lo[:, c], hi[:, c])
            q = torch.where(fixed[:, c], fixed_value[:, c], (k - zero[:, c]) * scale[:, c])
            Q[:, c] = q
            e = (col - q) / Ub[j, j]
            Wb[:, j:] -= e[:, None] * Ub[j, j:][None, :]
            Err[:, j] = e
        W[:, b1:] -= Err @ U[b0:b1, b1:]
    deployed = Q[:, inv]
    handed = torch.where(grid.fixed, w.detach().double(), deployed)
    return handed, deployed


# ---------------------------------------------------------------- calibration statistics


_WINDOWS: dict[tuple, torch.Tensor] = {}  # per tokenizer and shape: every export of a run reads the same windows


def calibration_windows(tokenizer, cfg, n_windows: int, window_len: int, train_bytes: int) -> torch.Tensor:
    """n_windows windows [n, L] of the training split (never the held-out split): documents picked evenly over the
    whole split (every module, not the first ones in file order) up to train_bytes, tokenized, windows spread evenly."""
    from pit_export.models.corpus import build_corpus
    from pit_export.models.train import encode_docs

    L = min(window_len, cfg.max_seq_len)
    key = (id(tokenizer), cfg.bos_id, cfg.eos_id, n_windows, L, train_bytes)
    if key in _WINDOWS:
        return _WINDOWS[key]
    train, _held = build_corpus(max_heldout_bytes=0)
    if not train:
        raise BadInput("calibrated rounding: no training-split text found (the Python standard library sources)")
    step = max(1, round(sum(map(len, train)) / train_bytes))
    stream = encode_docs(tokenizer, train[::step], cfg.bos_id, cfg.eos_id)
    n = len(stream) // L
    if n < 1:
        raise BadInput("calibrated rounding: the training split is shorter than one window")
    pick = np.linspace(0, n - 1, min(n_windows, n)).round().astype(int)
    _WINDOWS[key] = stream[: n * L].view(n, L)[torch.from_numpy(pick)]
    return _WINDOWS[key]


@dataclass
class Stats:
    grams: dict[str, torch.Tensor] = field(default_factory=dict)  # weight name -> sum x x^T of its input (float64)
    emb_fisher: torch.Tensor | None = None  # sum_n g_n g_n^T, g_n = dLoss / d(embedding output)
    positions: int = 0


SAME_INPUT = {"wk": "wq", "wv": "wq", "w3": "w1"}  # linears that read the same tensor share one second moment


def gram_key(name: str) -> str:
    """The Stats.grams key of a weight's input second moment: layers.i.attention.wk.weight -> ...wq.weight."""
    parts = name.split(".")
    if len(parts) >= 2:
        parts[-2] = SAME_INPUT.get(parts[-2], parts[-2])
    return ".".join(parts)


def layer_stats(dec: Decoder, windows: torch.Tensor, names: set[str]):
    """The input second moments, one layer at a time: runs every window through layer 0, then layer 1, ... (the
    windows' hidden states kept between layers: n x L x d floats) and yields one Stats per layer with the grams of
    that layer's weights in `names` (float64, keyed by gram_key), then a last Stats with the head's: "head" (the
    table's head input: after head_proj in the compact layouts), "gather" (the gathered rows, embed_proj's input) and
    head_proj.weight's input. Memory: one layer's grams at a time (24 x 4864^2 float64 = 4.5 GB for Qwen2.5-0.5B's
    down projections at once), for the cost of one forward."""
    from pit_export.models.pit import rms_norm, ropes_at

    cfg = dec.cfg
    L = windows.shape[1]
    pos = torch.arange(L)
    ropes, masks = ropes_at(dec, cfg, pos), dec.masks(pos)
    keys = {gram_key(n) for n in names}
    with torch.no_grad():
        xs = []
        gather = 0
        for w in windows:
            rows = dec.table(w[None]) if dec.layout != "untied" else None
            if rows is not None:
                gather = gather + _gram(rows)
            x = dec.embed(w[None])
            xs.append(x * cfg.embed_scale if cfg.embed_scale != 1.0 else x)
        for i, layer in enumerate(dec.layers):
            st = Stats(positions=L * len(windows))
            hooks = [
                mod.register_forward_hook(lambda m, inp, o, k=key, g=st.grams: _add(g, k, inp[0]))
                for name, mod in layer.named_modules()
                if isinstance(mod, nn.Linear) and (key := f"layers.{i}.{name}.weight") in keys
            ]
            try:
                for j in range(len(xs)):
                    layer.attention.reset_cache()
                    xs[j] = layer(xs[j], ropes, masks, pos)
            finally:
                for h in hooks:
                    h.remove()
                layer.attention.reset_cache()
            yield st
        st = Stats(positions=L * len(windows))
        for x in xs:
            h = rms_norm(x, cfg.norm_eps)
            if dec.layout == "untied":
                _add(st.grams, "head", h)
            else:
                _add(st.grams, "head_proj.weight", h)
                _add(st.grams, "head", dec.head_proj(h))
        if dec.layout != "untied":
            st.grams["gather"] = st.grams["embed_proj.weight"] = gather
        yield st


def _add(grams: dict, key: str, x: torch.Tensor) -> None:
    grams[key] = grams.get(key, 0) + _gram(x)


def _gram(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().reshape(-1, x.shape[-1])  # one window's product in the model's precision, summed in float64
    return (x.T @ x).double()


def collect(dec: Decoder, model, windows: torch.Tensor, names: set[str]) -> Stats:
    """Every gram of layer_stats at once (+ the empirical Fisher of the embedding output from the training graph
    `model`, layout-independent: the embedding is the same; None without a model)."""
    st = Stats()
    for part in layer_stats(dec, windows, names):
        st.grams.update(part.grams)
        st.positions = part.positions
    if model is not None:
        st.emb_fisher = embedding_fisher(model, windows)
    return st


def embedding_fisher(model, windows: torch.Tensor) -> torch.Tensor:
    """sum over positions of g g^T, g = d(sum of next-token losses) / d(embedding output), on the training graph."""
    import torch.nn.functional as F

    d = model.cfg.dim
    acc = torch.zeros(d, d, dtype=torch.float64)
    embed = model.embed
    try:
        for w in windows:
            with torch.no_grad():
                e = embed(w[None]).detach()
            e.requires_grad_(True)
            model.embed = lambda _tokens, e=e: e  # the instance attribute shadows the method inside hidden()
            logits = model(w[None])
            loss = F.cross_entropy(logits[0, :-1].float(), w[1:], reduction="sum")
            (g,) = torch.autograd.grad(loss, e)
            g = g.reshape(-1, d).double()
            acc += g.T @ g
    finally:
        del model.embed
    return acc


# ---------------------------------------------------------------- applying it to folded weights


def quantized_weights(fw: FoldedWeights, scheme, backend: str, mode: str) -> dict[str, int]:
    """name -> bits of the weights `backend` quantizes under `scheme` (groups of 32; 8 = CoreML's calibrated d x d
    transforms) whose grid is known here; the V x d tables first."""
    out: dict[str, int] = {}
    if scheme.linear_bits == 4:
        if mode == "all":
            for k, v in fw.tensors.items():
                if k.startswith("layers.") and k.endswith(".weight") and v.dim() == 2:
                    out[k] = 4
        for k in ("table.weight", "output.weight"):
            if k in fw.tensors:
                out[k] = 4
    emb = "tok_embeddings.weight"
    if emb in fw.tensors:
        if backend in ("executorch", "onnx") and scheme.embedding_bits == 4:  # ONNX: GatherBlockQuantized, same grid
            out[emb] = 4
        elif backend == "coreml" and scheme.linear_bits == 4:  # the gather's table follows the scheme there
            out[emb] = 4
    if backend == "executorch" and "table.weight" in fw.tensors and scheme.embedding_bits not in (None, 4):
        out.pop("table.weight", None)  # read by an 8-bit gather too: one table cannot sit on both grids
    if backend == "coreml" and scheme.calibration and scheme.linear_bits == 4:
        out.update({k: 8 for k in TRANSFORMS if k in fw.tensors})  # export/coreml.py: int8 blocks of 32, calibrated
    return dict(sorted(out.items(), key=lambda kv: kv[0] not in TABLES))


def group_of(bits: int, w: torch.Tensor) -> int:
    return 32  # 4-bit tables and linears, and CoreML's calibrated 8-bit d x d transforms: blocks of 32 columns


def apply(
    fw: FoldedWeights,
    model,
    tokenizer,
    scheme,
    backend: str,
    cfg: CalibrationConfig | None = None,
    windows: torch.Tensor | None = None,
    mapped: str | None = None,
    inplace: bool = False,
):
    """A FoldedWeights whose 4-bit weights lie on `backend`'s grid, GPTQ-rounded; and a summary for the manifest.

    model: the training graph (the embedding's Fisher); windows [n, L]: calibration tokens (default: the training
    split's, calibration_windows). mapped: the memory-mapped checkpoint file the folded weights may share pages with;
    once a weight is rounded, the resident pages of its original there are given back (clean pages: a later read
    maps them again from the file), so that the rounded copies do not add up beside the originals (1.4 GB at 0.5B).
    inplace: `fw` is this export's own (not reused afterwards): its V x d tables that are not the model's own tensors
    (the fold computed them) are overwritten with their rounded values instead of copied."""
    import time

    from pit_export.memory import release_file_pages

    cfg = cfg or CalibrationConfig(mode=getattr(scheme, "calibration", None) or "table")
    if cfg.mode not in MODES:
        raise BadInput(f"calibrated rounding: unknown mode {cfg.mode!r} (choose from {', '.join(MODES)})")
    t0 = time.perf_counter()
    targets = quantized_weights(fw, scheme, backend, cfg.mode)
    if not targets:
        return fw, {"method": "rtn", "note": "no 4-bit weight with a known grid under this scheme"}
    if windows is None:
        windows = calibration_windows(tokenizer, fw.cfg, cfg.n_windows, cfg.window_len, cfg.train_bytes)
    dec = Decoder(FoldedWeights(fw.cfg, fw.layout, dict(fw.tensors), fw.meta))
    tensors = dict(fw.tensors)
    summary: dict = {"method": "gptq", "mode": cfg.mode, "backend": backend, "weights": {}}
    source = dict(fw.tensors)  # what each weight is rounded from (statistics come from the unrounded model)

    model_storage = {t.untyped_storage().data_ptr() for t in (model.state_dict().values() if model is not None else ())}

    def round_one(name: str, bits: int, st: Stats) -> None:
        H = hessian(name, fw, st, cfg.embedding_weight)
        w = source[name]
        # a V x d table the fold computed for this export is rounded in place (no second V x d beside it)
        out = w if inplace and name in TABLES and w.untyped_storage().data_ptr() not in model_storage else None
        tensors[name], summary["weights"][name] = round_rows(w, H, backend, bits, cfg, out=out)
        if mapped is not None:
            release_file_pages(mapped, [w], [])

    # the embedding's Fisher first (the training graph reads every original weight); then the body one layer at a time
    # (its grams freed before the next layer's); then the tables and the transforms on the last Stats, which holds the
    # head's grams
    fisher = embedding_fisher(model, windows) if any(k in TABLES for k in targets) else None
    if mapped is not None and model is not None:  # its last read: the pages the folded weights do not share go back
        release_file_pages(mapped, list(model.state_dict().values()), list(fw.tensors.values()))
    for st in layer_stats(dec, windows, set(targets)):
        for name in [k for k in targets if k.startswith("layers.") and gram_key(k) in st.grams]:
            round_one(name, targets[name], st)
    st.emb_fisher = fisher
    for name in (k for k in targets if k in TABLES):
        round_one(name, targets[name], st)
    if fw.layout == "shared-z" and "table.weight" in targets:
        # re-fit the embedding's map to the rounded table so that the deployed interface is exact again, W E = I (no
        # cost in KL, measured), before the map's own rounding where the backend compresses it (8 bits at most). Fitted
        # to the float head transform: fitted to its rounded value the map inherits that rounding error amplified by
        # cond(T) (KL x2 with int8 transforms on CoreML, measured)
        gram = rounded_gram(tensors["table.weight"], backend, 4, 32)
        source["embed_proj.weight"] = exact_embed_proj(fw, gram=gram).float()
        tensors["embed_proj.weight"] = source["embed_proj.weight"].contiguous()
        summary["refit"] = "embed_proj: W E = I for the rounded table"
    for name in (k for k in targets if k in TRANSFORMS):
        round_one(name, targets[name], st)
    summary.update(
        {
            "calibration": {
                "split": "train",
                "windows": len(windows),
                "window_len": int(windows.shape[1]),
                "positions": st.positions,
            },
            "damp": cfg.damp,
            "act_order": cfg.act_order,
            "embedding_weight": cfg.embedding_weight,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    )
    return FoldedWeights(fw.cfg, fw.layout, tensors, dict(fw.meta)), summary


ROW_CHUNK = 4096  # rows of a V x d table rounded at a time: float64 work space ~ 10 x 4096 x d x 8 bytes, not V x d


def round_rows(w: torch.Tensor, H: torch.Tensor, backend: str, bits: int, cfg: CalibrationConfig, out=None):
    """GPTQ of w [R, C] on `backend`'s grid in chunks of ROW_CHUNK rows (the feedback factor computed once): the float32
    weight to hand the backend, and {off_grid, proxy_rtn, proxy_gptq} (how many handed weights the backend's RTN puts
    off GPTQ's codes; the layer's relative output error under RTN and under GPTQ, _proxy). `out`: where the handed
    rows go (w itself rounds it in place: each chunk is written after its last read)."""
    group = group_of(bits, w)
    feedback = error_feedback(H, cfg.damp, cfg.act_order)
    H = H.double()
    handed = torch.empty(w.shape, dtype=torch.float32) if out is None else out
    off_grid, sums = 0, torch.zeros(3, dtype=torch.float64)
    for rows in (slice(i, i + ROW_CHUNK) for i in range(0, len(w), ROW_CHUNK)):
        wc = w[rows]
        grid = grid_params(wc, backend, bits, group)
        h, deployed = gptq(wc, None, grid, feedback=feedback)
        W = wc.double()  # grid.fixed_value: the backend's RTN of every element
        sums += torch.stack([_quad(W - grid.fixed_value, H), _quad(W - deployed, H), _quad(W, H)])
        h = h.float()
        off_grid += int((~torch.isclose(rtn(h, backend, bits, group), deployed, rtol=1e-5, atol=1e-7)).sum())
        handed[rows] = h
    den = sums[2].clamp(min=1e-300)
    return handed, {"off_grid": off_grid, "proxy_rtn": float(sums[0] / den), "proxy_gptq": float(sums[1] / den)}


def _quad(D: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,jk,ik->", D, H, D)


def exact_embed_proj(
    fw: FoldedWeights,
    table: torch.Tensor | None = None,
    head_proj: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """shared-z's embed_proj weight for which the interface of `table` (the deployed Z^) is exact: with
    W = unembed(I) = diag(1/g) A Z^T (A = head_proj^T) and E = Z^ P, P = (A Z^T Z^)^-1 diag(g) gives W E = I_d.
    `head_proj`: the deployed head transform (default: the folded one). For Z^ = Z (Z^T Z = I) and the folded head
    transform this is T^-1, the fold's own map. Only Z^T Z is used: `gram` gives it instead of the table. float64."""
    A = (fw.tensors["head_proj.weight"] if head_proj is None else head_proj).double().T
    g = 1.0 / fw.tensors["inv_gain"].double()
    if gram is None:
        Z = table.double()
        gram = Z.T @ Z
    return torch.linalg.solve(A @ gram, torch.diag(g)).T  # as a Linear weight (z @ P = F.linear(z, P^T))


def rounded_gram(w: torch.Tensor, backend: str, bits: int, group: int) -> torch.Tensor:
    """R^T R of R = rtn(w), ROW_CHUNK rows at a time: a V x d table's rounded value is never held whole (float64, with
    the rounding's work space, it was 3.6 GB beside the model at Qwen2.5-0.5B)."""
    out = torch.zeros(w.shape[1], w.shape[1], dtype=torch.float64)
    for i in range(0, w.shape[0], ROW_CHUNK):
        r = rtn(w[i : i + ROW_CHUNK], backend, bits, group)
        out += r.T @ r
    return out


def hessian(name: str, fw: FoldedWeights, st: Stats, embedding_weight: float = 1.0) -> torch.Tensor:
    """H of one weight: its inputs' second moment; for a V x d table, its head use plus its embedding use."""
    if name in ("table.weight", "output.weight"):
        H = st.grams["head"].clone()
    elif name == "tok_embeddings.weight":
        H = torch.zeros(fw.cfg.dim, fw.cfg.dim, dtype=torch.float64)
    elif name == "embed_proj.weight":
        H = st.grams["gather"]
    else:
        return st.grams[gram_key(name)]
    if name in ("table.weight", "tok_embeddings.weight") and st.emb_fisher is not None and embedding_weight:
        P = fw.tensors["embed_proj.weight"].double().T if "embed_proj.weight" in fw.tensors else None
        G = st.emb_fisher if P is None else P @ st.emb_fisher @ P.T
        H = H + embedding_weight * G
    return H


def _proxy(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T) / tr(W H W^T): the layer's relative output error on the calibration inputs."""
    W = w.double()
    return float(_quad(W - q, H) / _quad(W, H).clamp(min=1e-300))


def describe(mode: str | None) -> str:
    return "round to nearest" if not mode else f"GPTQ on the backend's grid ({mode})"

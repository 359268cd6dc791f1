"""Fold a checkpoint into the static inference graph: no solves left at inference time.

PIT:   E = Z T^-1 (two triangular solves in float64, never an explicit inverse of T)
       W_head = diag(g) T Z^T (the final RMSNorm gain g folded in)
Tied and untied baselines fold the same way with T = I, so every comparison runs through one code path.

The fold report states cond(T) and how far the stored fp32 interface is from the reference's:
max |W E - (W E)_ref| with W = unembed(I_d), E = embed(0..V-1), next to its rounding-error bound.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from pit_export.decoder import LAYOUTS, Decoder, FoldedWeights
from pit_export.errors import BadInput
from pit_export.models.checkpoint import CONFIG, TOKENIZER, Checkpoint, atomic_dir, save_tensors
from pit_export.models.pit import Transformer

U32 = 2.0**-24  # unit roundoff of fp32
FOLDED_WEIGHTS, FOLDED_META = "folded.safetensors", "pit_export.json"


def layouts_for(tying: str) -> tuple[str, ...]:
    return {"pit": LAYOUTS, "tied": ("untied", "shared-e"), "untied": ("untied",)}[tying]


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term fp dot product."""
    return n * u / (1 - n * u)


@dataclass
class FoldReport:
    layout: str
    tying: str
    cond_T: float  # 1.0 for tied/untied (T = I)
    interface_err_max: float  # max |W E - (W E)_ref|, fp32 weights evaluated exactly
    interface_err_fro: float
    interface_bound_max: float  # elementwise rounding bound, max over entries
    interface_within_bound: bool
    table_params: int  # V-sized weights
    transform_params: int  # d x d weights of the layout
    body_params: int
    fp32_bytes: int
    warnings: list[str]


def _body_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("layers."):
            out[k.replace("_norm.weight", "_norm")] = v.float()  # shared with the model: nothing writes to either
    return out


def rows64(table: torch.Tensor, f) -> torch.Tensor:
    """f (shape-preserving) applied in float64 to row chunks of a V x d table, written into one fp32 result: no
    V x d float64 temporaries, and no list of fp32 chunks beside their concatenation."""
    out = torch.empty(table.shape, dtype=torch.float32)
    for c in vocab_chunks(len(table)):
        out[c] = f(table[c].double())
    return out


def fold(ckpt: Checkpoint | Transformer, layout: str) -> tuple[FoldedWeights, FoldReport]:
    model = ckpt.model if isinstance(ckpt, Checkpoint) else ckpt
    cfg = model.cfg
    if layout not in layouts_for(cfg.tying):
        raise BadInput(f"layout {layout!r} is not available for tying={cfg.tying} (choose {layouts_for(cfg.tying)})")
    d = cfg.dim
    g = model.norm.weight.double()
    I = torch.eye(d, dtype=torch.float64)
    t = _body_tensors(model)
    t["inv_gain"] = (1.0 / g).float()
    cond = 1.0
    if cfg.tying == "pit":
        L, Z = model.pit.cholesky_factor().double(), model.pit.z
        T = L @ L.T
        ev = torch.linalg.eigvalsh(T)
        cond = (ev.max() / ev.min()).item()

        def embed_rows(z):  # E^T = T^-1 Z^T by two triangular solves: L Y = Z^T, L^T E^T = Y
            return torch.linalg.solve_triangular(L.T, torch.linalg.solve_triangular(L, z.T, upper=False), upper=True).T

        if layout == "untied":  # output.weight = (diag(g) T Z^T)^T
            t["tok_embeddings.weight"], t["output.weight"] = rows64(Z, embed_rows), rows64(Z, lambda z: z @ T * g)
        elif layout == "shared-z":
            T_inv = torch.cholesky_solve(I, L)  # triangular solves again; symmetric up to rounding
            t["table.weight"], t["embed_proj.weight"], t["head_proj.weight"] = Z, T_inv.T, (g[:, None] * T).T
        else:  # shared-e: T Z^T = T (E T)^T = T^2 E^T
            t["table.weight"], t["head_proj.weight"] = rows64(Z, embed_rows), (g[:, None] * (T @ T)).T
    elif cfg.tying == "tied":
        W = model.tok_embeddings.weight
        if layout == "untied":
            t["tok_embeddings.weight"], t["output.weight"] = W, rows64(W, lambda w: w * g)
        else:
            t["table.weight"], t["head_proj.weight"] = W, torch.diag(g)
    else:
        t["tok_embeddings.weight"] = model.tok_embeddings.weight
        t["output.weight"] = rows64(model.output.weight, lambda w: w * g)
    tensors = {k: v.float().contiguous() for k, v in t.items()}
    fw = FoldedWeights(cfg, layout, tensors, {"cond_T": cond})
    return fw, _report(fw, model, cond)


VOCAB_CHUNK = 8192  # the interface products are sums over tokens: d x d accumulators, never a V x d float64 table


def vocab_chunks(V: int, chunk: int = VOCAB_CHUNK) -> list[slice]:
    return [slice(s, min(V, s + chunk)) for s in range(0, V, chunk)]


def reference_interface(model: Transformer) -> torch.Tensor:
    """(W E)_ref in float64 from the training graph itself: I_d for PIT (up to ~1e-14), E^T E for tied.

    W E = sum over token chunks c of W[:, c] E[c], each from the model's own embed/unembed on its chunk."""
    eye = torch.eye(model.cfg.dim, dtype=torch.float64)
    acc = torch.zeros_like(eye)
    for c in vocab_chunks(model.cfg.vocab_size):
        m = interface_model(model, c)
        with torch.no_grad():
            acc += m.unembed(eye) @ m.embed(torch.arange(c.stop - c.start))
    return acc


INTERFACE_PARAMS = {"pit": ("z",), "tok_embeddings": ("weight",), "output": ("weight",)}  # what embed/unembed read


def interface_model(
    model: Transformer,
    tokens: slice | torch.Tensor | None = None,
    dtype=torch.float64,
    tables: dict[str, torch.Tensor] | None = None,
) -> Transformer:
    """A copy of the model's embed/unembed only (float64 unless `dtype` says otherwise), optionally restricted to
    tokens (a range or ids: the V-sized parameters sliced) or with those parameters replaced by `tables` (rows read
    elsewhere, keyed as interface_tables names them): the body stays shared and fp32, so a large model's reference
    interface costs a chunk. The tables are always copies, never views: a view would pin the model's whole storage,
    which for a memory-mapped checkpoint is every weight."""
    import copy

    m = copy.copy(model)
    m._modules = {}
    for name, mod in model._modules.items():
        if name not in INTERFACE_PARAMS:
            continue
        sub = m._modules[name] = copy.copy(mod)
        params = {}
        for k, p in mod._parameters.items():
            if p is not None and k in INTERFACE_PARAMS[name]:
                p = tables[f"{name}.{k}"] if tables is not None else p[tokens] if tokens is not None else p
            params[k] = None if p is None else nn.Parameter(p.to(dtype, copy=True), requires_grad=False)
        sub._parameters = params
    return m


def interface_tables(model: Transformer) -> dict[str, torch.Tensor]:
    """The V-sized parameters embed/unembed read, as "module.param"."""
    return {
        f"{name}.{k}": p
        for name, mod in model._modules.items()
        for k, p in mod._parameters.items()
        if name in INTERFACE_PARAMS and k in INTERFACE_PARAMS[name] and p is not None
    }


def interface_matrices(dec: Decoder) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        W = dec.unembed(torch.eye(dec.cfg.dim, dtype=dec.inv_gain.dtype))  # d x V
        E = dec.embed(torch.arange(dec.cfg.vocab_size))  # V x d
    return W, E


TABLES = ("table.weight", "tok_embeddings.weight", "output.weight")  # the folded V x d tensors


def interface_weights(fw: FoldedWeights, tokens: slice | None = None, fn=None) -> FoldedWeights:
    """The folded tables without the body (a zero-layer decoder: embed/unembed unchanged), optionally restricted to a
    token range (V-sized tensors sliced) and mapped by fn (e.g. abs)."""
    V = fw.cfg.vocab_size
    cfg = replace(fw.cfg, n_layers=0, vocab_size=tokens.stop - tokens.start if tokens else V)
    tensors = {}
    for k, v in fw.tensors.items():
        if not k.startswith("layers."):
            v = v[tokens] if tokens and k in TABLES else v
            tensors[k] = fn(v) if fn else v
    return FoldedWeights(cfg, fw.layout, tensors)


def interface_product(fw: FoldedWeights, fn=None) -> torch.Tensor:
    """W E of the stored fp32 weights (mapped by fn) evaluated exactly (float64), one token chunk at a time."""
    acc = torch.zeros(fw.cfg.dim, fw.cfg.dim, dtype=torch.float64)
    for c in vocab_chunks(fw.cfg.vocab_size):
        W, E = interface_matrices(Decoder(interface_weights(fw, c, fn)).double())
        acc += W @ E
    return acc


def interface_bound(fw: FoldedWeights) -> torch.Tensor:
    """Elementwise bound on |W E - (W E)_ref| from fp32 storage and fp32 evaluation of the layout's chain.

    Each of W = diag(1/g) A B^T and E = C D is a chain of at most two length-d products of rounded factors, so
    |W'E' - WE| <= 2 gamma_{2d+4} (|W|-chain)(|E|-chain), with the chains evaluated on absolute values."""
    return 2 * gamma(2 * fw.cfg.dim + 4) * interface_product(fw, torch.abs)


def _report(fw: FoldedWeights, model: Transformer, cond: float) -> FoldReport:
    err = interface_product(fw) - reference_interface(model)  # fp32-rounded weights evaluated exactly
    bound = interface_bound(fw)
    cfg = fw.cfg
    V = cfg.vocab_size
    tables = sum(v.numel() for v in fw.tensors.values() if v.shape[0] == V)
    transforms = sum(v.numel() for k, v in fw.tensors.items() if k.endswith("_proj.weight"))
    body = sum(v.numel() for k, v in fw.tensors.items() if k.startswith("layers."))
    total = sum(v.numel() for v in fw.tensors.values())
    return FoldReport(
        layout=fw.layout,
        tying=cfg.tying,
        cond_T=cond,
        interface_err_max=err.abs().max().item(),
        interface_err_fro=torch.linalg.norm(err).item(),
        interface_bound_max=bound.max().item(),
        interface_within_bound=bool((err.abs() <= bound + 1e-12).all()),
        table_params=tables,
        transform_params=transforms,
        body_params=body,
        fp32_bytes=4 * total,
        warnings=_warnings(fw.layout, cond),
    )


def _warnings(layout: str, cond: float) -> list[str]:
    # shared-e's head multiplies by T^2 and then E^T ~ T^-1: relative accuracy ~ cond(T)^2 u (measured, see tests)
    if layout == "shared-e" and cond**2 * U32 > 1e-4:
        return [f"shared-e head loses ~cond(T)^2 u = {cond**2 * U32:.1e} relative accuracy; prefer shared-z"]
    if cond * U32 > 1e-4:
        return [f"cond(T) = {cond:.3g}: fp32 embeddings lose ~{cond * U32:.1e} relative accuracy"]
    return []


# ---------------------------------------------------------------- folded checkpoint on disk (backend "torch")


def save_folded(dest: Path, fw: FoldedWeights, report: FoldReport, ckpt: Checkpoint, force: bool = False) -> Path:
    def write(tmp: Path):
        save_tensors(fw.tensors, tmp / FOLDED_WEIGHTS, {"layout": fw.layout})
        (tmp / CONFIG).write_text(fw.cfg.to_json())
        ckpt.tokenizer.save(str(tmp / TOKENIZER))
        meta = {"backend": "torch", "layout": fw.layout, "scheme": "fp32", "source": str(ckpt.path)}
        meta["fold_report"] = asdict(report)
        (tmp / FOLDED_META).write_text(json.dumps(meta, indent=2))

    return atomic_dir(dest, write, force)


def load_folded(path: Path) -> FoldedWeights:
    from pit_export.models.checkpoint import artifact_config, layer_count, read_header

    path = Path(path)
    cfg = artifact_config(path)
    if not (path / FOLDED_WEIGHTS).is_file():
        raise BadInput(f"{path}: {FOLDED_WEIGHTS} missing")
    header = read_header(path / FOLDED_WEIGHTS)
    n, gap = layer_count(header)
    if n != cfg.n_layers or gap is not None:
        raise BadInput(f"{path / CONFIG} n_layers={cfg.n_layers}, but the folded weights hold {n} layers")
    for name in ("table.weight", "tok_embeddings.weight"):
        if name in header and header[name][1] != (cfg.vocab_size, cfg.dim):
            raise BadInput(
                f"{path / CONFIG} vocab_size={cfg.vocab_size}, dim={cfg.dim} disagree with the weights: {name} has "
                f"shape {list(header[name][1])}"
            )
    try:
        meta = json.loads((path / FOLDED_META).read_text())
        tensors = load_file(path / FOLDED_WEIGHTS)
    except (OSError, ValueError, KeyError, TypeError) as e:  # SafetensorError is not an OSError
        raise BadInput(f"{path}: unreadable folded model ({str(e).splitlines()[0]})") from None
    except Exception as e:
        raise BadInput(f"{path}: unreadable folded model ({type(e).__name__}: {e})") from None
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise BadInput(f"{path}: tensor {bad[0]} has non-finite values")
    return FoldedWeights(cfg, meta.get("layout", "?"), tensors, meta)

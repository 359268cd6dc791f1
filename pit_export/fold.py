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

from pit_export.decoder import LAYOUTS, Decoder, FoldedWeights
from pit_export.errors import BadInput
from pit_export.models.checkpoint import CONFIG, TOKENIZER, Checkpoint, atomic_dir, save_tensors
from pit_export.models.pit import ModelConfig, Transformer

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
            out[k.replace("_norm.weight", "_norm")] = v.float().clone()
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
        L, Z = model.pit.cholesky_factor().double(), model.pit.z.double()
        T = L @ L.T
        ev = torch.linalg.eigvalsh(T)
        cond = (ev.max() / ev.min()).item()
        # E^T = T^-1 Z^T by two triangular solves: L Y = Z^T, L^T E^T = Y
        E = torch.linalg.solve_triangular(L.T, torch.linalg.solve_triangular(L, Z.T, upper=False), upper=True).T
        if layout == "untied":
            t["tok_embeddings.weight"], t["output.weight"] = E, Z @ T * g  # output.weight = (diag(g) T Z^T)^T
        elif layout == "shared-z":
            T_inv = torch.cholesky_solve(I, L)  # triangular solves again; symmetric up to rounding
            t["table.weight"], t["embed_proj.weight"], t["head_proj.weight"] = Z, T_inv.T, (g[:, None] * T).T
        else:  # shared-e: T Z^T = T (E T)^T = T^2 E^T
            t["table.weight"], t["head_proj.weight"] = E, (g[:, None] * (T @ T)).T
    elif cfg.tying == "tied":
        W = model.tok_embeddings.weight.double()
        if layout == "untied":
            t["tok_embeddings.weight"], t["output.weight"] = W, W * g
        else:
            t["table.weight"], t["head_proj.weight"] = W, torch.diag(g)
    else:
        t["tok_embeddings.weight"] = model.tok_embeddings.weight.double()
        t["output.weight"] = model.output.weight.double() * g
    tensors = {k: v.float().contiguous() for k, v in t.items()}
    fw = FoldedWeights(cfg, layout, tensors, {"cond_T": cond})
    return fw, _report(fw, model, cond)


def reference_interface(model: Transformer) -> torch.Tensor:
    """(W E)_ref in float64 from the training graph itself: I_d for PIT (up to ~1e-14), E^T E for tied."""
    m = float64_interface(model)
    with torch.no_grad():
        W = m.unembed(torch.eye(model.cfg.dim, dtype=torch.float64))
        E = m.embed(torch.arange(model.cfg.vocab_size))
    return W @ E


def float64_interface(model: Transformer) -> Transformer:
    """A float64 view of the model's embed/unembed only: the body stays shared (and fp32), so the reference interface
    of a large model costs one float64 table, not a float64 copy of every weight."""
    import copy

    m = copy.copy(model)
    m._modules = {k: copy.deepcopy(v).double() for k, v in model._modules.items() if k in INTERFACE_MODULES}
    return m


INTERFACE_MODULES = ("pit", "tok_embeddings", "output")  # what Transformer.embed / unembed read


def interface_matrices(dec: Decoder) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        W = dec.unembed(torch.eye(dec.cfg.dim, dtype=dec.inv_gain.dtype))  # d x V
        E = dec.embed(torch.arange(dec.cfg.vocab_size))  # V x d
    return W, E


def interface_weights(fw: FoldedWeights) -> FoldedWeights:
    """The folded tables without the body (a zero-layer decoder): embed/unembed are the same, at a fraction of the
    memory when evaluated in float64."""
    cfg = replace(fw.cfg, n_layers=0)
    return FoldedWeights(cfg, fw.layout, {k: v for k, v in fw.tensors.items() if not k.startswith("layers.")})


def interface_bound(fw: FoldedWeights) -> torch.Tensor:
    """Elementwise bound on |W E - (W E)_ref| from fp32 storage and fp32 evaluation of the layout's chain.

    Each of W = diag(1/g) A B^T and E = C D is a chain of at most two length-d products of rounded factors, so
    |W'E' - WE| <= 2 gamma_{2d+4} (|W|-chain)(|E|-chain), with the chains evaluated on absolute values."""
    iw = interface_weights(fw)
    abs_fw = FoldedWeights(iw.cfg, fw.layout, {k: v.abs() for k, v in iw.tensors.items()})
    Wa, Ea = interface_matrices(Decoder(abs_fw).double())
    return 2 * gamma(2 * fw.cfg.dim + 4) * (Wa @ Ea)


def _report(fw: FoldedWeights, model: Transformer, cond: float) -> FoldReport:
    dec = Decoder(interface_weights(fw)).double()  # fp32-rounded weights evaluated exactly: the fold's own error
    W, E = interface_matrices(dec)
    err = W @ E - reference_interface(model)
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


def save_folded(dest: Path, fw: FoldedWeights, report: FoldReport, ckpt: Checkpoint) -> Path:
    def write(tmp: Path):
        save_tensors(fw.tensors, tmp / FOLDED_WEIGHTS, {"layout": fw.layout})
        (tmp / CONFIG).write_text(fw.cfg.to_json())
        ckpt.tokenizer.save(str(tmp / TOKENIZER))
        meta = {"backend": "torch", "layout": fw.layout, "scheme": "fp32", "source": str(ckpt.path)}
        meta["fold_report"] = asdict(report)
        (tmp / FOLDED_META).write_text(json.dumps(meta, indent=2))

    return atomic_dir(dest, write)


def load_folded(path: Path) -> FoldedWeights:
    path = Path(path)
    try:
        meta = json.loads((path / FOLDED_META).read_text())
        cfg = ModelConfig.from_dict(json.loads((path / CONFIG).read_text()))
        tensors = load_file(path / FOLDED_WEIGHTS)
    except (OSError, ValueError, KeyError, TypeError) as e:  # SafetensorError is not an OSError
        raise BadInput(f"{path}: unreadable folded model ({str(e).splitlines()[0]})") from None
    except Exception as e:
        raise BadInput(f"{path}: unreadable folded model ({type(e).__name__}: {e})") from None
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise BadInput(f"{path}: tensor {bad[0]} has non-finite values")
    return FoldedWeights(cfg, meta.get("layout", "?"), tensors, meta)

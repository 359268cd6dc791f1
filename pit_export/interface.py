"""How alike are a model's input and output tables? Diagnostics for any tied, untied or PIT model.

E (V x d): the embedding of every token.  W (V x d): the head's rows without the final-norm gain, unembed(I_d)^T.
    cosine_identity      per-token cos(e_t, w_t)
    cosine_procrustes    per-token cos(e_t R, w_t), R = argmin_{R orthogonal} |E R - W|_F = polar(E^T W)
    cosine_lstsq         per-token cos(e_t M, w_t), M = argmin_M |E M - W|_F
    knn10_overlap        |kNN_10(t; E) ∩ kNN_10(t; W)| / 10, neighbours by cosine, t itself excluded
    delta_TI_selfsim     mean_{t,s} |cos(e_t, e_s) - cos(w_t, w_s)|: how differently the two tables see the
                         vocabulary (0 when one table is an orthogonal transform of the other up to row scale; this is
                         the table-level tying inconsistency, next to inspect's |W_out E - I|)
Tied: W = E, everything is 1 (0 for delta). PIT: W = Z T and E = Z T^-1, so M = T^2 maps E onto W exactly
(cosine_lstsq = 1) while identity and Procrustes cosines fall with cond(T).
Neighbourhood statistics use a fixed sample of query tokens against the whole vocabulary, in chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

K = 10


def tables(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, W) in float64 from a training-graph Transformer."""
    from pit_export.fold import interface_model

    m = interface_model(model)
    with torch.no_grad():
        E = m.embed(torch.arange(model.cfg.vocab_size))
        W = m.unembed(torch.eye(model.cfg.dim, dtype=torch.float64)).T
    return E, W


def _summary(x: torch.Tensor) -> dict[str, float]:
    return {"mean": x.mean().item(), "p05": torch.quantile(x.float(), 0.05).item(), "min": x.min().item()}


def diagnostics(E: torch.Tensor, W: torch.Tensor, n_queries: int = 1024, chunk: int = 256) -> dict:
    E, W = E.double(), W.double()
    u, _, vh = torch.linalg.svd(E.T @ W)
    R = u @ vh
    M = torch.linalg.lstsq(E, W).solution
    out = {
        "cosine_identity": _summary(F.cosine_similarity(E, W, dim=1)),
        "cosine_procrustes": _summary(F.cosine_similarity(E @ R, W, dim=1)),
        "cosine_lstsq": _summary(F.cosine_similarity(E @ M, W, dim=1)),
    }
    V = E.shape[0]
    queries = torch.linspace(0, V - 1, min(n_queries, V)).round().long()
    En, Wn = F.normalize(E, dim=1), F.normalize(W, dim=1)
    overlap, gap = [], []
    for s in range(0, len(queries), chunk):
        q = queries[s : s + chunk]
        se, sw = En[q] @ En.T, Wn[q] @ Wn.T  # [n, V] cosine self-similarity
        gap.append((se - sw).abs().mean(1))
        rows = torch.arange(len(q))
        se[rows, q], sw[rows, q] = -2.0, -2.0  # exclude the token itself
        ke, kw = se.topk(K, dim=1).indices, sw.topk(K, dim=1).indices
        overlap.append((ke[:, :, None] == kw[:, None, :]).any(-1).double().mean(1))
    out["knn10_overlap"] = torch.cat(overlap).mean().item()
    out["delta_TI_selfsim"] = torch.cat(gap).mean().item()
    out["n_queries"] = len(queries)
    return out


def model_diagnostics(model, n_queries: int = 1024) -> dict:
    return diagnostics(*tables(model), n_queries=n_queries)

"""Interface diagnostics: the invariances that define them, on the shipped models and constructed tables."""

import pytest
import torch

from pit_export.interface import diagnostics, model_diagnostics

TOL = 1e-9  # float64 throughout


def test_tied_model_tables_are_identical(tied_ckpt):
    d = model_diagnostics(tied_ckpt.model, n_queries=256)
    for k in ("cosine_identity", "cosine_procrustes", "cosine_lstsq"):
        assert d[k]["min"] == pytest.approx(1.0, abs=TOL)
    assert d["knn10_overlap"] == 1.0 and d["delta_TI_selfsim"] <= TOL


def test_pit_tables_are_related_by_t_squared(pit_ckpt):
    """E = Z T^-1, W = Z T: the least-squares map T^2 is exact, E^T W = I so Procrustes adds nothing to identity."""
    d = model_diagnostics(pit_ckpt.model, n_queries=256)
    assert d["cosine_lstsq"]["min"] == pytest.approx(1.0, abs=1e-6)
    assert d["cosine_procrustes"]["mean"] == pytest.approx(d["cosine_identity"]["mean"], abs=1e-6)
    assert d["cosine_identity"]["mean"] < 1.0


def test_rotation_and_row_scale_invariance():
    """W = diag(s) E Q: identity cosines see the rotation; Procrustes, kNN overlap and delta_TI_selfsim do not."""
    g = torch.Generator().manual_seed(0)
    E = torch.randn(500, 24, dtype=torch.float64, generator=g)
    Q = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64, generator=g))[0]
    W = (E @ Q) * torch.rand(500, 1, dtype=torch.float64, generator=g).add(0.5)
    d = diagnostics(E, W, n_queries=100)
    assert d["cosine_procrustes"]["min"] == pytest.approx(1.0, abs=TOL)
    assert d["knn10_overlap"] == 1.0 and d["delta_TI_selfsim"] <= TOL
    assert d["cosine_identity"]["mean"] < 0.9

from pathlib import Path

import numpy as np
import pytest
import torch
from pit_export.models.checkpoint import load_checkpoint
from pit_export.models.pit import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "pit-tiny"
TIED_MODEL = ROOT / "models" / "tied-tiny"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def pit_ckpt():
    return load_checkpoint(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tied_ckpt():
    return load_checkpoint(TIED_MODEL)


@pytest.fixture(scope="session")
def et_fp32_dir(pit_ckpt, tmp_path_factory):
    """The default model as an fp32 .pte in a shared-table layout (model.pte + model.ptd), exported once per run."""
    from pit_export.export import export_artifact

    out = tmp_path_factory.mktemp("et") / "fp32"
    export_artifact(pit_ckpt, "android", out, scheme="fp32", layout="shared-z")
    return out


@pytest.fixture(scope="session")
def heldout(pit_ckpt):
    from pit_export.models.train import heldout_windows

    return np.asarray(heldout_windows(pit_ckpt.tokenizer, pit_ckpt.config))


def random_pit(seed: int, dim=48, vocab=384, layers=2, spread=0.3, **kw) -> Transformer:
    """A random PIT model with a non-trivial T (random strict-lower part and log-diagonal) and final-norm gain."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab, dim=dim, n_layers=layers, n_heads=4, n_kv_heads=2, ffn_dim=2 * dim, max_seq_len=32, **kw
    )
    m = Transformer(cfg)
    with torch.no_grad():
        if cfg.tying == "pit":
            m.pit.l_strict.normal_(0, spread / dim**0.5)
            m.pit.l_log_diag.normal_(0, spread)
        m.norm.weight.uniform_(0.5, 2.0)
    return m.eval().requires_grad_(False)

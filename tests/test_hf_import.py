"""import-hf: HF Llama layout == training graph, exactness of --init input/output, KL report, bad input."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from pit_export.models.checkpoint import load_checkpoint
from pit_export.models.pit import ModelConfig, Transformer
from safetensors.torch import load_file, save_file

from pit_export.errors import BadInput
from pit_export.fold import gamma
from pit_export.hf_import import import_hf, pit_config, pit_state, read_config, read_tensors

from .conftest import DEFAULT_MODEL
from .hf_models import save_hf

TOKENIZER = DEFAULT_MODEL / "tokenizer.json"
TINY = dict(vocab_size=4096, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tied_ckpt):
    """Three teachers: the trained tied-tiny saved in HF layout, random tiny tied and untied HF models."""
    root = tmp_path_factory.mktemp("hf")
    out = {"tied-tiny": root / "tied-tiny"}
    save_hf(out["tied-tiny"], tied_ckpt.config, TOKENIZER, tied_ckpt.model)
    for tying in ("tied", "untied"):
        out[tying] = root / tying
        save_hf(out[tying], ModelConfig(**TINY, tying=tying), TOKENIZER, seed=1)
    return out


def teacher_and_pit(src, init):
    cfg = read_config(src, 64)
    tensors = read_tensors(src, cfg)
    state, stats = pit_state(cfg, tensors, init)
    return cfg, tensors, Transformer.from_checkpoint_state(pit_config(cfg), state), stats


@pytest.mark.parametrize("name", ["tied-tiny", "tied", "untied"])
def test_teacher_graph_matches_transformers(hf_dirs, name):
    """Same weights, same logits: the HF layout (rotate-half RoPE, q/k order) needs no permutation."""
    from transformers import LlamaForCausalLM

    src = hf_dirs[name]
    cfg = read_config(src, 64)
    ours = Transformer.from_checkpoint_state(cfg, read_tensors(src, cfg))
    hf = LlamaForCausalLM.from_pretrained(src).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = hf(x).logits, ours(x)
    # fp32, different op order: error relative to the logit scale ~ depth * d * u
    tol = 4 * cfg.n_layers * gamma(cfg.dim) * b.abs().max().item()
    assert (a - b).abs().max().item() <= tol


@pytest.mark.parametrize("name", ["tied-tiny", "untied"])
def test_output_init_reproduces_teacher_head(hf_dirs, name):
    """T = H: (h L L^T) Z^T == h W0^T. fp32 storage of L, Z (u each) and a chain of three length-d products give the
    componentwise bound gamma_{3d+3} (|h| |L| |L^T| |Z^T|); the float64 polar/Cholesky error is far below it."""
    cfg, t, pit, _ = teacher_and_pit(hf_dirs[name], "output")
    W0 = t.get("output.weight", t["tok_embeddings.weight"]).double()
    h = torch.randn(16, cfg.dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = pit.unembed(h).double()
        L, Z = pit.pit.cholesky_factor().double(), pit.pit.z.double()
    want = h.double() @ W0.T
    bound = gamma(3 * cfg.dim + 3) * (h.double().abs() @ L.abs() @ L.T.abs() @ Z.T.abs())
    assert ((got - want).abs() <= bound).all()


@pytest.mark.parametrize("name", ["tied-tiny", "untied"])
def test_input_init_reproduces_teacher_embeddings(hf_dirs, name):
    """T = H^-1: two triangular solves give Z T^-1 = E0 up to (2 kappa + sqrt(kappa)) gamma_{d+1} |e_t| per row,
    kappa = cond(T) (forward error of each solve ~ cond(L) gamma_d, plus the rounding of Z and L)."""
    cfg, t, pit, stats = teacher_and_pit(hf_dirs[name], "input")
    E0 = t["tok_embeddings.weight"].double()
    with torch.no_grad():
        got = pit.embed(torch.arange(cfg.vocab_size)).double()
    k = stats["cond_T"]
    bound = (2 * k + math.sqrt(k)) * gamma(cfg.dim + 1) * E0.norm(dim=1)
    assert ((got - E0).norm(dim=1) <= bound).all()


def test_identity_init_is_procrustes_for_untied(hf_dirs):
    """Identity: Z = polar(E0 + W0) fits both tables at least as well as either table's own polar factor."""
    cfg, t, pit, _ = teacher_and_pit(hf_dirs["untied"], "identity")
    E0, W0 = t["tok_embeddings.weight"].double(), t["output.weight"].double()

    def fit(Z):
        return (Z - E0).norm() ** 2 + (Z - W0).norm() ** 2

    z = pit.pit.z.double()
    for init in ("input", "output"):
        other = teacher_and_pit(hf_dirs["untied"], init)[2].pit.z.double()
        assert fit(z) <= fit(other) * (1 + 1e-6)


def test_import_cli_reports_kl_and_writes_loadable_checkpoint(hf_dirs, tmp_path):
    out = tmp_path / "pit"
    p = subprocess.run(
        [sys.executable, "-m", "pit_export", "import-hf", hf_dirs["tied-tiny"], "--out", out, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["init"] == "output" and rep["tying"] == "tied"
    assert rep["kl_mean"] >= 0 and math.isfinite(rep["kl_mean"]) and rep["positions"] > 0
    c = load_checkpoint(out)
    assert c.config.tying == "pit" and c.tokenizer.get_vocab_size() == c.config.vocab_size
    assert json.loads((out / "import_report.json").read_text())["kl_mean"] == rep["kl_mean"]


def test_import_kl_matches_direct_forward(hf_dirs, tmp_path, tied_ckpt):
    """The reported KL is the training graph's: recompute it from the written checkpoint and the teacher."""
    from pit_export.hf_import import compare, heldout

    rep = import_hf(hf_dirs["tied-tiny"], tmp_path / "p", "input", 64, 2, progress=lambda m: None)
    c = load_checkpoint(tmp_path / "p")
    again = compare(tied_ckpt.model, c.model, heldout(c.tokenizer, c.config, 2))
    assert again["kl_mean"] == pytest.approx(rep.kl_mean, rel=1e-4, abs=1e-9)


def _edit_config(**kw):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(kw)
        (d / "config.json").write_text(json.dumps(cfg))

    return edit


def _nan_tensor(d):
    t = load_file(d / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})


def _only_pickle(d):
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: (d / "config.json").unlink(), "config.json missing"),
        (_edit_config(architectures=["GPT2LMHeadModel"]), "unsupported architecture"),
        # Qwen2 has q/k/v biases: a folder without them contradicts its architecture
        (_edit_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2"), r"_proj\.bias missing"),
        (_edit_config(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0}), "low_freq_factor"),
        (_edit_config(rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}), "'yarn'"),
        (_edit_config(vocab_size=4097), "vocab_size=4097 disagrees with the weights"),
        (_nan_tensor, "non-finite"),
        (_only_pickle, "never loaded"),
    ],
)
def test_bad_input(hf_dirs, tmp_path, edit, message):
    src = tmp_path / "src"
    shutil.copytree(hf_dirs["tied"], src)
    edit(src)
    with pytest.raises(BadInput, match=message):
        import_hf(src, tmp_path / "out", progress=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_bad_input_cli_exit_code(tmp_path):
    (tmp_path / "src").mkdir()
    p = subprocess.run(
        [sys.executable, "-m", "pit_export", "import-hf", tmp_path / "src", "--out", tmp_path / "o"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "config.json missing" in p.stderr

"""Hugging Face Llama models built locally with transformers (random init or from a training-graph model): the
teachers for the import tests and the scale benchmark. Nothing is downloaded."""

from __future__ import annotations

import shutil
from pathlib import Path

from pit_export.models.pit import ModelConfig, Transformer

from pit_export.hf_import import tensor_names


def llama_config(cfg: ModelConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tying == "tied",
        bos_token_id=cfg.bos_id,
        eos_token_id=cfg.eos_id,
    )


def save_hf(dest: Path, cfg: ModelConfig, tokenizer: Path, model: Transformer | None = None, seed: int = 0):
    """save_pretrained of LlamaForCausalLM(cfg): random init, or carrying `model`'s weights; plus tokenizer.json."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    hf = LlamaForCausalLM(llama_config(cfg))
    if model is not None:
        sd = model.state_dict()
        missing, _ = hf.load_state_dict(
            {hf_name: sd[ours] for ours, hf_name in tensor_names(cfg).items()}, strict=False
        )
        assert set(missing) <= {"lm_head.weight"}, missing
        hf.tie_weights()
    hf.save_pretrained(dest)
    shutil.copy(tokenizer, Path(dest) / "tokenizer.json")
    return hf.eval()


# ---------------------------------------------------------------- the families, as transformers builds them

FAMILY_BASE = dict(
    vocab_size=4096,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=1,
)
WINDOW = 8  # shorter than the test prompts: sliding layers must mask


def family_configs() -> dict:
    """A tiny config per family, saved by transformers as on the Hub, each with the features its family uses at
    non-trivial values (head_dim != hidden/heads, a sliding window shorter than the prompt, RoPE scaling, NoPE)."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config, SmolLM3Config

    llama3 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
        "rope_theta": 500000.0,
    }
    return {
        "llama3": LlamaConfig(**FAMILY_BASE, head_dim=32, rope_parameters=llama3),  # onnx-cpu: fused (hd % 16 == 0)
        "qwen2": Qwen2Config(**FAMILY_BASE, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        "qwen3": Qwen3Config(
            **FAMILY_BASE, head_dim=24, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
        ),
        "gemma3": Gemma3TextConfig(
            **{**FAMILY_BASE, "bos_token_id": 2, "pad_token_id": 0},
            head_dim=24,
            query_pre_attn_scalar=20,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            },
            final_logit_softcapping=0.5,
        ),
        "smollm3": SmolLM3Config(
            **FAMILY_BASE,
            pad_token_id=0,
            no_rope_layers=[1, 1, 1, 0],
            rope_parameters={"rope_type": "default", "rope_theta": 2e6},
        ),
    }


def family_model(name: str, seed: int = 0):
    """The family's CausalLM, random init, with an orthonormal token table (so PIT with T = I is exact), non-zero
    biases and norm weights away from their init."""
    import torch
    from pit_export.models.pit import random_orthonormal
    from transformers import AutoModelForCausalLM

    cfg = family_configs()[name]
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        hf.get_input_embeddings().weight.copy_(random_orthonormal(cfg.vocab_size, cfg.hidden_size, g))
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "norm" in n:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    hf.tie_weights()
    return hf


def save_family(dest: Path, name: str, tokenizer: Path, seed: int = 0):
    hf = family_model(name, seed)
    hf.save_pretrained(dest)
    shutil.copy(tokenizer, Path(dest) / "tokenizer.json")
    return hf

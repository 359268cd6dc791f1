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

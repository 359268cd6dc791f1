"""The folded inference graph: the one model definition every backend exports.

An ordinary Llama-style decoder: no triangular solves, static shapes, a static KV cache written at explicit
positions, RoPE tables precomputed, no data-dependent Python control flow. The PIT interface is a `layout`:

    untied    embedding = E[t]                       head = h @ W_head^T          (E, W_head: V x d each)
    shared-z  embedding = Z[t] @ T^-1                head = (h @ diag(g) T) @ Z^T (one V x d table + 2 d x d)
    shared-e  embedding = E[t]                       head = (h @ diag(g) T^2) @ E^T

`unembed(h)` is the head without the final-norm gain (h T Z^T): the round-trip probe, head(h / g).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pit_export.models.pit import (
    ACT,
    ModelConfig,
    allowed,
    apply_rope,
    attend,
    register_rope,
    rms_norm,
    ropes_at,
    softcap,
)

LAYOUTS = ("untied", "shared-z", "shared-e")


@dataclass
class FoldedWeights:
    """Everything the inference graph needs; produced by fold.fold(), stored by fold.save_folded()."""

    cfg: ModelConfig
    layout: str
    tensors: dict[str, torch.Tensor]  # body (layers.*) + layout tables, fp32
    meta: dict = field(default_factory=dict)
    mapped: str | None = None  # the memory-mapped checkpoint file whose pages the tensors may share (fold leaves
    # the weights it does not change as the checkpoint's own tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def release(self) -> None:
        """Drop the tensors (a backend whose weights are written frees them before its runtime reloads them), and
        the resident pages of `mapped` they held: the checkpoint's model keeps the mapping, and reads the clean pages
        again from the file if it runs later (validation's reference)."""
        if self.mapped is not None:
            from pit_export.memory import release_file_pages

            release_file_pages(self.mapped, list(self.tensors.values()), [])
        self.tensors.clear()


def grouped_attention(q, keys, values, mask, rep: int, scale: float | None = None, cap: float | None = None):
    """Grouped-query attention without repeating the cache; returns the heads concatenated, [b, s, H * hd].

    q [b, H, s, hd]; keys, values [b, H / rep, S, hd]; mask [s, S] (bool, True = attend) or [b, 1, s, S] (additive).
    Query head h = g * rep + r reads KV head g, so each group's queries are stacked along the sequence axis (row
    i * rep + r) and attend to their one KV head: the cache is read in place instead of being copied rep times per
    layer and token. Stacked as (position, head) rather than (head, position): the latter's reshape guards on the
    dynamic length in a form torch.export cannot prove. No sizes are read from tensors (traced exporters keep them
    symbolic)."""
    q = q.unflatten(1, (-1, rep)).transpose(2, 3).flatten(2, 3)  # [b, H / rep, s * rep, hd]
    y = attend(q, keys, values, mask.repeat_interleave(rep, dim=-2), scale, cap)
    return y.unflatten(2, (-1, rep)).permute(0, 2, 1, 3, 4).flatten(2)


def _linear(n_in: int, n_out: int, bias: bool = False) -> nn.Linear:
    # on the meta device: the Decoder assigns the folded tensors, so a random init would be time and a heap that
    # glibc keeps after it is freed (0.4 GB of resident memory at 135M)
    return nn.Linear(n_in, n_out, bias=bias, device="meta")


def _gain(n: int) -> nn.Parameter:
    return nn.Parameter(torch.ones(n, device="meta"))


class CachedAttention(nn.Module):
    """Layer `layer`'s attention: projections (+ biases), per-head q/k norms, RoPE (its layer's tables, or none),
    then the cache write and attention over the cache (full or sliding mask). Subclasses change the cache handling
    (write_cache) or the attention kernel (forward); the projections are this class's."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        hd = cfg.head_dim
        self.n_heads, self.n_kv, self.hd, self.eps = cfg.n_heads, cfg.n_kv_heads, hd, cfg.norm_eps
        self.wq = _linear(cfg.dim, cfg.n_heads * hd, cfg.qkv_bias)
        self.wk = _linear(cfg.dim, cfg.n_kv_heads * hd, cfg.qkv_bias)
        self.wv = _linear(cfg.dim, cfg.n_kv_heads * hd, cfg.qkv_bias)
        self.wo = _linear(cfg.n_heads * hd, cfg.dim, cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm, self.k_norm = _gain(hd), _gain(hd)
        self.rope, self.sliding = cfg.rope_kind(layer), cfg.sliding(layer)
        self.scale, self.cap = cfg.attn_scale, cfg.attn_softcap
        shape = (1, cfg.n_kv_heads, cfg.max_seq_len, hd)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def project(self, x, ropes):
        """q [b, H, s, hd], k and v [b, H_kv, s, hd], norms and RoPE applied: what every cache handling starts from."""
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.hd)
        k = self.wk(x).view(b, s, self.n_kv, self.hd)
        if self.qk_norm:
            q, k = rms_norm(q, self.eps) * self.q_norm, rms_norm(k, self.eps) * self.k_norm
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if self.rope is not None:
            cos, sin = ropes[self.rope]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, self.wv(x).view(b, s, self.n_kv, self.hd).transpose(1, 2)

    def mask(self, masks: dict):
        return masks["sliding" if self.sliding else "full"]

    def forward(self, x, ropes, masks, cache):
        q, k, v = self.project(x, ropes)
        keys, values = self.write_cache(cache, k, v)
        y = grouped_attention(q, keys, values, self.mask(masks), self.n_heads // self.n_kv, self.scale, self.cap)
        return self.wo(y)

    def write_cache(self, input_pos, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v at input_pos; returns the keys and values to attend to (the whole static cache)."""
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache

    def reset_cache(self) -> None:
        for buf in self.buffers():
            buf.zero_()


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = _linear(cfg.dim, cfg.ffn_dim, cfg.mlp_bias)
        self.w3 = _linear(cfg.dim, cfg.ffn_dim, cfg.mlp_bias)
        self.w2 = _linear(cfg.ffn_dim, cfg.dim, cfg.mlp_bias)
        self.act = ACT[cfg.hidden_act]

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0, attention: type[CachedAttention] = CachedAttention):
        super().__init__()
        self.eps, self.sandwich = cfg.norm_eps, cfg.sandwich_norm
        self.attention_norm = _gain(cfg.dim)
        self.attention = attention(cfg, layer)
        self.ffn_norm = _gain(cfg.dim)
        self.feed_forward = FeedForward(cfg)
        if cfg.sandwich_norm:
            self.post_attention_norm, self.post_ffn_norm = _gain(cfg.dim), _gain(cfg.dim)

    def forward(self, x, ropes, masks, cache):
        """`cache` is what the attention's write_cache takes (positions, a slice, past tensors)."""
        h = self.attention(rms_norm(x, self.eps) * self.attention_norm, ropes, masks, cache)
        x = x + (rms_norm(h, self.eps) * self.post_attention_norm if self.sandwich else h)
        h = self.feed_forward(rms_norm(x, self.eps) * self.ffn_norm)
        return x + (rms_norm(h, self.eps) * self.post_ffn_norm if self.sandwich else h)


class Decoder(nn.Module):
    """forward(tokens [1, n], input_pos [n]) -> logits [1, n, V]; prefill is n > 1, decode is n = 1.

    `attention` swaps the KV-cache handling (a backend whose converter needs another cache write subclasses
    CachedAttention); everything else is this one graph."""

    def __init__(self, fw: FoldedWeights, attention: type[CachedAttention] = CachedAttention):
        super().__init__()
        cfg, self.cfg, self.layout = fw.cfg, fw.cfg, fw.layout
        self.layers = nn.ModuleList(Block(cfg, i, attention) for i in range(cfg.n_layers))
        d, V = cfg.dim, cfg.vocab_size
        if fw.layout == "untied":
            self.tok_embeddings = nn.Embedding(V, d, device="meta")
            self.output = _linear(d, V)
        else:  # one table read by both the gather and the head
            self.table = nn.Embedding(V, d, device="meta")
            self.head_proj = _linear(d, d)
            if fw.layout == "shared-z":
                self.embed_proj = _linear(d, d)
        self.register_buffer("inv_gain", torch.ones(d))  # 1/g: lets unembed() drop the folded final-norm gain
        register_rope(self, cfg)
        self.register_buffer("positions", torch.arange(cfg.max_seq_len), persistent=False)
        # assign: the folded tensors themselves become the parameters (no second copy of the model)
        missing, unexpected = self.load_state_dict(fw.tensors, strict=False, assign=True)
        missing = [m for m in missing if "cache" not in m and not m.startswith(("rope_", "positions"))]
        if missing or unexpected:
            raise KeyError(f"folded weights do not fit layout {fw.layout}: missing {missing} unexpected {unexpected}")
        self.eval().requires_grad_(False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.layout == "untied":
            return self.tok_embeddings(tokens)
        x = self.table(tokens)
        return self.embed_proj(x) if self.layout == "shared-z" else x

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from the final-normed (gain-free) hidden state; the gain is folded into the weights."""
        if self.layout == "untied":
            return self.output(h)
        return F.linear(self.head_proj(h), self.table.weight)

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden * self.inv_gain)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.run(tokens, input_pos, self.masks(input_pos), [input_pos] * len(self.layers))

    def masks(self, q_pos: torch.Tensor) -> dict[str, torch.Tensor]:
        """[n, max_seq_len] bool masks over the static cache for queries at q_pos: causal, and causal within the
        window for sliding layers (only where the config has them)."""
        out = {"full": allowed(q_pos, self.positions, None)}
        if self.cfg.has_sliding:
            out["sliding"] = allowed(q_pos, self.positions, self.cfg.sliding_window)
        return out

    def run(self, tokens: torch.Tensor, pos, masks: dict, caches: list) -> torch.Tensor:
        """pos indexes the RoPE tables (positions, a slice, or batched position ids [b, 1, s]); masks as masks()
        gives them (or in another form the attention accepts); caches[i] is what layer i's write_cache takes."""
        x = self.embed(tokens)
        if self.cfg.embed_scale != 1.0:
            x = x * self.cfg.embed_scale
        ropes = ropes_at(self, self.cfg, pos)
        for layer, cache in zip(self.layers, caches, strict=True):
            x = layer(x, ropes, masks, cache)
        return softcap(self.head(rms_norm(x, self.cfg.norm_eps)), self.cfg.final_softcap)

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.attention.reset_cache()


class EntryPoint(nn.Module):
    """One of the Decoder's probe methods (embed, unembed) as a module, for exporters that trace one per function."""

    def __init__(self, dec: Decoder, method: str):
        super().__init__()
        self.dec, self.method = dec, method
        self.eval()

    def forward(self, x):
        return getattr(self.dec, self.method)(x)

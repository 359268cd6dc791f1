"""The training graph: a Llama-style decoder with a `tying` switch (pit | tied | untied).

This is the numerical reference for everything pit-export produces. It runs full sequences (no KV cache) in fp32
and computes the PIT embedding with two triangular solves, exactly as in training.

PIT (Pseudo-Inverse Tying):
    Z  (V x d)  orthonormal token memory, Z^T Z = I          checkpoint tensor `pit.z`
    L  (d x d)  lower-triangular, positive diagonal           checkpoint tensor `pit.l`
    T = L L^T   SPD hidden-space transform
    embed(t)  = z_t T^-1        (solve L y = z_t^T, then L^T x = y)
    logits(h) = h T Z^T = ((h L) L^T) Z^T
so the head and the embedding are pseudo-inverses: (T Z^T)(Z T^-1) = I_d for every T.
L is parametrised as strict-lower part + exp(log-diagonal), so its diagonal stays positive while training.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

TYINGS = ("pit", "tied", "untied")


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    dim: int = 192
    n_layers: int = 4
    n_heads: int = 6
    n_kv_heads: int = 2
    ffn_dim: int = 512
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tying: str = "pit"
    train_z: bool = False  # Z frozen after init (the paper's default); True re-orthonormalises after each step
    bos_id: int = 0
    eos_id: int = 1
    # Family features. At their defaults the block is a plain Llama one, and a config may omit them.
    head_size: int | None = None  # per-head dim where it is not dim / n_heads (Qwen3, Gemma 3, Llama 3.2)
    qkv_bias: bool = False  # q, k, v projection biases (Qwen2.5)
    o_bias: bool = False  # output projection bias (Llama's attention_bias sets both)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3)
    sandwich_norm: bool = False  # RMSNorm after attention and after the FFN too, before each residual add (Gemma 3)
    hidden_act: str = "silu"  # the GLU gate: silu | gelu_tanh (Gemma)
    embed_scale: float = 1.0  # the embedding is multiplied by it (Gemma: sqrt(dim))
    attn_scale: float | None = None  # softmax scale; None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    rope_scaling: dict | None = None  # {"rope_type": "linear", "factor"} or llama3's, see ROPE_SCALING_KEYS
    sliding_window: int | None = None  # keys a sliding layer attends to, its own position included
    layer_types: list | None = None  # "full" | "sliding" per layer; None: all full
    rope_local_theta: float | None = None  # RoPE base of sliding layers, unscaled (Gemma 3); None: as full layers
    nope_layers: list = field(default_factory=list)  # layers without RoPE (SmolLM3)
    final_softcap: float | None = None  # logits = c * tanh(logits / c)
    attn_softcap: float | None = None  # the same on attention scores, before the mask

    @property
    def head_dim(self) -> int:
        return self.head_size or self.dim // self.n_heads

    def sliding(self, layer: int) -> bool:
        return self.layer_types is not None and self.layer_types[layer] == "sliding"

    def rope_kind(self, layer: int) -> str | None:
        """The RoPE tables a layer reads: "global", "local" (sliding layers with their own base) or None (NoPE)."""
        if layer in self.nope_layers:
            return None
        return "local" if self.sliding(layer) and self.rope_local_theta is not None else "global"

    @property
    def rope_kinds(self) -> list[str]:
        """The RoPE tables some layer reads. O(1) without layer_types: a config is sized before its layer count is
        checked against the weights."""
        if self.layer_types is None:
            return ["global"] if len(set(self.nope_layers)) < self.n_layers else []
        return sorted({k for i in range(len(self.layer_types)) if (k := self.rope_kind(i))})

    @property
    def has_sliding(self) -> bool:
        return self.layer_types is not None and "sliding" in self.layer_types

    def validate(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            want = {"int": int, "float": (int, float), "str": str, "bool": bool}.get(f.type)
            if want is None:  # other annotations check themselves below
                continue
            if not isinstance(v, want) or (f.type in ("int", "float") and isinstance(v, bool)):
                raise ValueError(f"{f.name} must be {f.type}, got {shown(v)}")
            if f.type in ("int", "float") and not (v > 0 or (f.name in ("bos_id", "eos_id") and v >= 0)):
                raise ValueError(f"{f.name} must be positive, got {shown(v)}")
            if f.type == "float" and not math.isfinite(v):
                raise ValueError(f"{f.name} must be finite, got {shown(v)}")
            if f.type == "int" and f.name in INT_BOUNDS and v > INT_BOUNDS[f.name]:
                raise ValueError(f"{f.name}={shown(v)} is beyond {INT_BOUNDS[f.name]:,} ({BOUND_WHY[f.name]})")
        if max(self.bos_id, self.eos_id) >= self.vocab_size:
            raise ValueError(f"bos_id/eos_id must be < vocab_size={self.vocab_size}")
        if self.tying not in TYINGS:
            raise ValueError(f"tying must be one of {TYINGS}, got {shown(self.tying)}")
        if (self.head_size is None and self.dim % self.n_heads) or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads} do not divide")
        self._validate_family()
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.tying == "pit" and self.vocab_size < self.dim:
            raise ValueError(f"PIT needs vocab_size >= dim for orthonormal Z ({self.vocab_size} < {self.dim})")

    def _validate_family(self) -> None:
        def number(name, kind=float, positive=True):
            v = getattr(self, name)
            if v is None:
                return
            ok = (isinstance(v, (int, float)) if kind is float else isinstance(v, int)) and not isinstance(v, bool)
            if not ok or not math.isfinite(v) or (positive and v <= 0):
                raise ValueError(
                    f"{name} must be a positive {'number' if kind is float else 'integer'} or null, got {shown(v)}"
                )

        number("head_size", int)
        for name in ("attn_scale", "rope_local_theta", "final_softcap", "attn_softcap"):
            number(name)
        number("sliding_window", int)
        if self.head_size is not None and self.head_size > 1 << 16:
            raise ValueError(f"head_size={shown(self.head_size)} is beyond 65,536")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {shown(self.hidden_act)}")
        if self.layer_types is not None:
            if not isinstance(self.layer_types, list) or len(self.layer_types) != self.n_layers:
                raise ValueError(f"layer_types must list {self.n_layers} entries, got {shown(self.layer_types)}")
            bad = [t for t in self.layer_types if t not in LAYER_TYPES]
            if bad:
                raise ValueError(f"layer_types entries must be one of {LAYER_TYPES}, got {shown(bad[0])}")
            if "sliding" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding layers but sliding_window is null")
        if not isinstance(self.nope_layers, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_layers for i in self.nope_layers
        ):
            raise ValueError(f"nope_layers must list layer indices < {self.n_layers}, got {shown(self.nope_layers)}")
        check_rope_scaling(self.rope_scaling)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """A checkpoint's config: every key present (a missing rope_theta must not silently become the default),
        none unknown, each of its type and within its bounds."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known), key=str)
        if unknown:
            raise ValueError(
                f"unknown config key {shown(unknown[0])}" + (f" (and {len(unknown) - 1} more)" * (len(unknown) > 1))
            )
        missing = [k for k in known if k not in d and k not in FAMILY_FIELDS]
        if missing:
            raise ValueError(f"config key {missing[0]!r} missing")
        cfg = cls(**d)
        cfg.validate()
        return cfg


_NAMES = [f.name for f in fields(ModelConfig)]
FAMILY_FIELDS = frozenset(_NAMES[_NAMES.index("head_size") :])  # optional in a config: absent means off
ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full", "sliding")
ROPE_SCALING_KEYS = {  # rope_type -> the keys its scaling reads (all required, none other)
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_rope_scaling(rs) -> None:
    if rs is None:
        return
    if not isinstance(rs, dict):
        raise ValueError(f"rope_scaling must be an object or null, got {shown(rs)}")
    kind = rs.get("rope_type")
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"RoPE scaling {shown(kind)} is not supported (supported: {', '.join(ROPE_SCALING_KEYS)})")
    want = {"rope_type", *ROPE_SCALING_KEYS[kind]}
    if set(rs) != want:
        extra = sorted(set(rs) - want, key=str) or sorted(want - set(rs))
        raise ValueError(f"rope_scaling ({kind}) must have exactly the keys {sorted(want)}; see {shown(extra[0])}")
    for k in ROPE_SCALING_KEYS[kind]:
        v = rs[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"rope_scaling {k} must be a positive number, got {shown(v)}")
    if kind == "llama3" and rs["high_freq_factor"] <= rs["low_freq_factor"]:
        raise ValueError("rope_scaling high_freq_factor must exceed low_freq_factor")


# Upper bounds a config is held to before anything is allocated from it. The weights bound the sizes (the config must
# agree with the tensors the safetensors header lists); these catch what no tensor shape states.
MAX_CONTEXT = 1 << 20
INT_BOUNDS = {"max_seq_len": MAX_CONTEXT, "bos_id": 1 << 31, "eos_id": 1 << 31}
BOUND_WHY = {
    "max_seq_len": "the longest context pit-export exports; on-device models use up to 128K",
    "bos_id": "token ids are int32 in the exported graphs",
    "eos_id": "token ids are int32 in the exported graphs",
}


def shown(v, width: int = 40) -> str:
    """A config value for a one-line message: repr, cut to `width` characters."""
    r = repr(v)
    return r if len(r) <= width else f"{r[: width - 12]}... ({len(r):,} chars)"


# ---------------------------------------------------------------- shared building blocks (also used by fold)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def inv_freq(cfg: ModelConfig, kind: str = "global") -> torch.Tensor:
    """RoPE inverse frequencies [head_dim/2] in float64: the base's, then the config's scaling (full layers only;
    "local" tables are the sliding layers' own base, unscaled)."""
    hd = cfg.head_dim
    base = cfg.rope_local_theta if kind == "local" else cfg.rope_theta
    inv = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    rs = cfg.rope_scaling if kind == "global" else None
    if rs is None:
        return inv
    if rs["rope_type"] == "linear":
        return inv / rs["factor"]
    # llama3: long wavelengths divided by factor, short ones kept, a linear blend between (as transformers computes)
    factor, lo, hi, old = (rs[k] for k in ROPE_SCALING_KEYS["llama3"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(medium, blended, scaled)


def rope_tables(cfg: ModelConfig, kind: str = "global") -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim/2], computed in float64 then cast."""
    ang = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv_freq(cfg, kind))
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, h, s, hd] with interleaved-half layout (first half / second half), cos/sin [s, hd/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[s, S] bool: query at q_pos[i] attends to the key at k_pos[j] (causal, and within the window if any)."""
    ok = k_pos[None, :] <= q_pos[:, None]
    return ok if window is None else ok & (k_pos[None, :] > q_pos[:, None] - window)


def attend(q, k, v, mask, scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [soft-capped] + mask) v; mask bool (True = attend) or additive, broadcast to the
    scores. Without soft-capping this is SDPA itself."""
    if softcap is None:  # mask None: causal over equal-length q and k
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    return torch.softmax(s, dim=-1) @ v


def softcap(logits: torch.Tensor, c: float | None) -> torch.Tensor:
    return logits if c is None else c * torch.tanh(logits / c)


ACT = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.norm_eps), RMSNorm(hd, cfg.norm_eps)
        self.rope, self.sliding = cfg.rope_kind(layer), cfg.sliding(layer)

    def qkv(self, x, ropes):
        b, s, _ = x.shape
        c, hd = self.cfg, self.cfg.head_dim
        q = self.wq(x).view(b, s, c.n_heads, hd)
        k = self.wk(x).view(b, s, c.n_kv_heads, hd)
        v = self.wv(x).view(b, s, c.n_kv_heads, hd).transpose(1, 2)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if self.rope is not None:
            q, k = apply_rope(q, *ropes[self.rope]), apply_rope(k, *ropes[self.rope])
        return q, k, v

    def forward(self, x, ropes, masks):
        b, s, _ = x.shape
        q, k, v = self.qkv(x, ropes)
        rep = self.cfg.n_heads // self.cfg.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        mask = masks["sliding" if self.sliding else "full"]
        y = attend(q, k, v, mask, self.cfg.attn_scale, self.cfg.attn_softcap)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)  # down
        self.act = ACT[cfg.hidden_act]

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        if cfg.sandwich_norm:
            self.post_attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.post_ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.sandwich = cfg.sandwich_norm

    def forward(self, x, ropes, masks):
        h = self.attention(self.attention_norm(x), ropes, masks)
        x = x + (self.post_attention_norm(h) if self.sandwich else h)
        h = self.feed_forward(self.ffn_norm(x))
        return x + (self.post_ffn_norm(h) if self.sandwich else h)


def _rope_prefix(kind: str) -> str:
    return "rope" if kind == "global" else "rope_local"


def register_rope(module: nn.Module, cfg: ModelConfig) -> None:
    """The RoPE tables as non-persistent buffers of `module`: rope_cos/rope_sin, and rope_local_cos/rope_local_sin
    where sliding layers have their own base."""
    for kind in cfg.rope_kinds:
        cos, sin = rope_tables(cfg, kind)
        module.register_buffer(f"{_rope_prefix(kind)}_cos", cos, persistent=False)
        module.register_buffer(f"{_rope_prefix(kind)}_sin", sin, persistent=False)


def ropes_at(module: nn.Module, cfg: ModelConfig, pos) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each RoPE kind's (cos, sin) at `pos` (positions, a slice, or batched position ids) from register_rope's
    buffers."""
    return {
        k: (getattr(module, f"{_rope_prefix(k)}_cos")[pos], getattr(module, f"{_rope_prefix(k)}_sin")[pos])
        for k in cfg.rope_kinds
    }


# ---------------------------------------------------------------- PIT tying


def random_orthonormal(vocab: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """QR of a Gaussian, sign-fixed so the result is Haar-distributed."""
    g = torch.randn(vocab, dim, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r))).float()


def polar_factor(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin polar decomposition E0 = U H (U orthonormal V x d, H SPD d x d), in float64."""
    u, s, vh = torch.linalg.svd(table.double(), full_matrices=False)
    return u @ vh, vh.T @ torch.diag(s) @ vh


class PITTying(nn.Module):
    """Orthonormal Z and Cholesky factor L of T; embedding by triangular solves, head by (h L L^T) Z^T."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        z = random_orthonormal(cfg.vocab_size, cfg.dim)
        self.z = nn.Parameter(z, requires_grad=cfg.train_z)
        self.l_strict = nn.Parameter(torch.zeros(cfg.dim, cfg.dim))
        self.l_log_diag = nn.Parameter(torch.zeros(cfg.dim))

    def cholesky_factor(self) -> torch.Tensor:
        return torch.tril(self.l_strict, -1) + torch.diag(self.l_log_diag.exp())

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        L = self.cholesky_factor()
        zt = self.z[tokens.reshape(-1)].T  # [d, n]
        y = torch.linalg.solve_triangular(L, zt, upper=False)
        x = torch.linalg.solve_triangular(L.T, y, upper=True)
        return x.T.reshape(*tokens.shape, -1)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        L = self.cholesky_factor()
        return ((h @ L) @ L.T) @ self.z.T

    @torch.no_grad()
    def reorthonormalise(self) -> None:
        self.z.copy_(polar_factor(self.z)[0].float())

    # checkpoint form: the tensors a reader expects (`pit.z`, `pit.l`), not the parametrisation
    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"pit.z": self.z.detach(), "pit.l": self.cholesky_factor().detach()}


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.tying == "pit":
            self.pit = PITTying(cfg)
        else:
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
            nn.init.normal_(self.tok_embeddings.weight, std=cfg.dim**-0.5)
            if cfg.tying == "untied":
                self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_rope(cfg)
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):  # GPT-2 style scaled residual init
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))
            elif p.dim() == 2 and name.startswith("layers"):
                nn.init.normal_(p, std=0.02)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def register_rope(self, cfg: ModelConfig) -> None:
        register_rope(self, cfg)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.tying == "pit":
            return self.pit.embed(tokens)
        return self.tok_embeddings(tokens)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """The head without the final-norm gain (the round-trip probe)."""
        if self.cfg.tying == "pit":
            return self.pit.unembed(h)
        if self.cfg.tying == "tied":
            return h @ self.tok_embeddings.weight.T
        return self.output(h)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        s = tokens.shape[-1]
        if s > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {s} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(tokens)
        if self.cfg.embed_scale != 1.0:
            x = x * self.cfg.embed_scale
        pos = torch.arange(s)
        masks = {  # None: SDPA's own causal mask
            "full": None if self.cfg.attn_softcap is None else allowed(pos, pos, None),
            "sliding": allowed(pos, pos, self.cfg.sliding_window) if self.cfg.has_sliding else None,
        }
        ropes = ropes_at(self, self.cfg, slice(0, s))
        for layer in self.layers:
            x = layer(x, ropes, masks)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> logits [b, s, V]."""
        return softcap(self.unembed(self.hidden(tokens)), self.cfg.final_softcap)

    def state_for_checkpoint(self) -> dict[str, torch.Tensor]:
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("pit.")}
        if self.cfg.tying == "pit":
            sd.update({k: v.contiguous() for k, v in self.pit.export_tensors().items()})
        return sd

    def load_checkpoint_state(self, sd: dict[str, torch.Tensor], assign: bool = False) -> None:
        """Checkpoint tensors (`pit.l`, not its parametrisation) into the model; assign=True takes the tensors
        themselves as parameters instead of copying them (see from_checkpoint_state)."""
        sd = dict(sd)
        if self.cfg.tying == "pit" and "pit.l" in sd:
            l = sd.pop("pit.l")
            sd["pit.l_strict"], sd["pit.l_log_diag"] = torch.tril(l, -1), torch.diagonal(l).log()
        missing, unexpected = self.load_state_dict(sd, strict=False, assign=assign)
        if missing or unexpected:
            raise KeyError(f"missing {missing[:3]} unexpected {unexpected[:3]}")

    @classmethod
    def from_checkpoint_state(cls, cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> Transformer:
        """A model whose parameters are the given tensors: built on the meta device, so no random init (nor the QR of
        a V x d Gaussian) and no second copy of the weights. Memory-mapped tensors stay memory-mapped."""
        with torch.device("meta"):
            m = cls(cfg)
        m.load_checkpoint_state(sd, assign=True)
        for name, _ in list(m.named_buffers()):  # non-persistent buffers were built on meta
            delattr(m, name)
        m.register_rope(cfg)
        return m.eval().requires_grad_(False)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes for a config: what loading checks against. Spelled out, not read off a
    model built on the meta device: it runs before the config is trusted (tests check the two agree)."""
    d, hd, V = cfg.dim, cfg.head_dim, cfg.vocab_size
    q, kv, f = cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.ffn_dim
    per_layer = {
        "attention_norm.weight": (d,),
        "attention.wq.weight": (q, d),
        "attention.wk.weight": (kv, d),
        "attention.wv.weight": (kv, d),
        "attention.wo.weight": (d, q),
        "ffn_norm.weight": (d,),
        "feed_forward.w1.weight": (f, d),
        "feed_forward.w3.weight": (f, d),
        "feed_forward.w2.weight": (d, f),
    }
    if cfg.qkv_bias:
        per_layer |= {"attention.wq.bias": (q,), "attention.wk.bias": (kv,), "attention.wv.bias": (kv,)}
    if cfg.o_bias:
        per_layer["attention.wo.bias"] = (d,)
    if cfg.mlp_bias:
        per_layer |= {"feed_forward.w1.bias": (f,), "feed_forward.w3.bias": (f,), "feed_forward.w2.bias": (d,)}
    if cfg.qk_norm:
        per_layer |= {"attention.q_norm.weight": (hd,), "attention.k_norm.weight": (hd,)}
    if cfg.sandwich_norm:
        per_layer |= {"post_attention_norm.weight": (d,), "post_ffn_norm.weight": (d,)}
    shapes = {f"layers.{i}.{k}": v for i in range(cfg.n_layers) for k, v in per_layer.items()}
    shapes["norm.weight"] = (d,)
    if cfg.tying == "pit":
        shapes |= {"pit.z": (V, d), "pit.l": (d, d)}
    else:
        shapes["tok_embeddings.weight"] = (V, d)
        if cfg.tying == "untied":
            shapes["output.weight"] = (V, d)
    return shapes


def cache_bytes(cfg: ModelConfig) -> int:
    """Memory an exported model of this config holds for its context, whatever the target: the K and V caches of every
    layer (fp32, batch 1) and the RoPE tables (fp32, built in float64), at max_seq_len."""
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * cfg.max_seq_len * 4
    rope = len(cfg.rope_kinds) * cfg.max_seq_len * (cfg.head_dim // 2) * (2 * 4 + 3 * 8)
    return kv + rope

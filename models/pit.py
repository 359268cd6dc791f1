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
from dataclasses import asdict, dataclass, fields

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

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

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
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads} do not divide")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.tying == "pit" and self.vocab_size < self.dim:
            raise ValueError(f"PIT needs vocab_size >= dim for orthonormal Z ({self.vocab_size} < {self.dim})")

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
        missing = [k for k in known if k not in d]
        if missing:
            raise ValueError(f"config key {missing[0]!r} missing")
        cfg = cls(**d)
        cfg.validate()
        return cfg


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


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim/2], computed in float64 then cast."""
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    ang = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, h, s, hd] with interleaved-half layout (first half / second half), cos/sin [s, hd/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def qkv(self, x, cos, sin):
        b, s, _ = x.shape
        c, hd = self.cfg, self.cfg.head_dim
        q = self.wq(x).view(b, s, c.n_heads, hd).transpose(1, 2)
        k = self.wk(x).view(b, s, c.n_kv_heads, hd).transpose(1, 2)
        v = self.wv(x).view(b, s, c.n_kv_heads, hd).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        rep = self.cfg.n_heads // self.cfg.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


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
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.tying == "pit":
            self.pit = PITTying(cfg)
        else:
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
            nn.init.normal_(self.tok_embeddings.weight, std=cfg.dim**-0.5)
            if cfg.tying == "untied":
                self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):  # GPT-2 style scaled residual init
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))
            elif p.dim() == 2 and name.startswith("layers"):
                nn.init.normal_(p, std=0.02)

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
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> logits [b, s, V]."""
        return self.unembed(self.hidden(tokens))

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
        m.rope_cos, m.rope_sin = rope_tables(cfg)  # non-persistent buffers were built on meta
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
    rope = cfg.max_seq_len * (cfg.head_dim // 2) * (2 * 4 + 3 * 8)
    return kv + rope

"""Import a local Hugging Face Llama-family checkpoint (config.json + safetensors + tokenizer.json) as a PIT model.

Reads the folder directly (no transformers): tensors one at a time through safetensors' memory map, cast to fp32.
The teacher runs in the PIT training graph with tying tied|untied; its weight layout is HF's as is (q/k projections
in the rotate-half RoPE order the training graph uses), so no permutation is needed.

PIT from a teacher, by the thin polar decomposition of a table A = U H (U orthonormal V x d, H SPD d x d):
    Z = U,  T = L L^T chosen by --init:
      identity   T = I                       A = E0 + W0 (Procrustes: Z = argmin |Z - E0|^2 + |Z - W0|^2)
      input      T = H^-1, so Z T^-1 = U H = E0 exactly            A = E0
      output     T = H,    so T Z^T = H U^T = W0^T exactly          A = W0
where E0 is the teacher's input table and W0 its output table (W0 = E0 when tied: then input and output share Z and
differ only in T). The final RMSNorm gain stays the model's norm weight, so "output" reproduces the teacher's head on
the normed hidden state, gain included. For an untied teacher each of the three is the least-squares optimum of its
objective over (Z orthonormal, T SPD): the preserved side is matched with zero residual; identity fits both.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tokenizers import Tokenizer

from pit_export.errors import BadInput
from pit_export.fold import vocab_chunks
from pit_export.models import checkpoint
from pit_export.models.checkpoint import CheckpointError, save_checkpoint
from pit_export.models.pit import (
    ROPE_SCALING_KEYS,
    ModelConfig,
    Transformer,
    check_rope_scaling,
    expected_shapes,
    shown,
)
from pit_export.validate import text_source

INITS = ("identity", "input", "output")
# The families, by architecture: what each one's block is, as training-graph config fields. Config keys then refine
# them (biases, windows, RoPE); a key the graph cannot honour is refused by name.
FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "SmolLM3ForCausalLM": "smollm3",
    "Gemma3ForCausalLM": "gemma3",
}
ARCHITECTURES = tuple(FAMILIES)
MODEL_TYPES = {  # config.json model_type -> architecture, for folders without an architectures list
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
GEMMA = ("gemma3",)  # (1 + w) norm gains, stored as the multiplier itself
HF_CONFIG, HF_INDEX = "config.json", "model.safetensors.index.json"
POS_CHUNK = 8  # positions per float64 log-softmax: small, equal-sized temporaries the allocator reuses
# Keys whose values change the math, at the value that leaves it unchanged: any other value is refused by name.
NEUTRAL = {
    "partial_rotary_factor": (1, 1.0, None),
    "use_bidirectional_attention": (False, None),
    "pretraining_tp": (1, None),  # sliced matmuls: the same products, only the summation order differs
    "num_experts": (0, None),
    "num_local_experts": (0, None),
    "use_qk_norm": (False, None),
    "cross_attention_layers": (None, []),
    "attention_chunk_size": (None,),
}
MAX_LAYERS = 1 << 16  # bound before per-layer lists are built; the weights' header then gives the true count
ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


@dataclass
class ImportReport:
    source: str
    init: str
    tying: str  # the teacher's
    cond_T: float
    cond_table: float  # cond(A) of the polar-decomposed table
    ortho_err_max: float
    kl_mean: float | None  # KL(teacher || PIT) per position on held-out text, nats (None: Z and L were kept)
    kl_p99: float | None
    top1: float | None
    ppl_teacher: float | None
    ppl_pit: float
    positions: int
    eval_text: str = "held-out split"  # the text perplexity and KL were measured on (a file: its path and sha256)


# ---------------------------------------------------------------- config


def _first(x):
    if isinstance(x, list):
        return x[0] if x else None
    return x


def _obj(hf: dict, key: str) -> dict:
    v = hf.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise BadInput(f"config.json {key}={shown(v)} must be an object")
    return v


def _positive(where: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise BadInput(f"config.json {where}={shown(v)} must be a positive number")
    return float(v)


def _scaling(params: dict, where: str) -> tuple[float | None, dict | None]:
    """(theta or None, rope_scaling or None) of one RoPE parameter set: v5's rope_parameters (theta inside) or
    v4's rope_scaling. Only the keys a type reads are taken; any other key with an effect is refused by name."""
    kind = params.get("rope_type", params.get("type")) or "default"
    if not isinstance(kind, str):
        raise BadInput(f"config.json {where}.rope_type={shown(kind)} must be a string")
    theta = params.get("rope_theta")
    theta = None if theta is None else _positive(f"{where}.rope_theta", theta)
    if kind == "default":
        used: tuple = ()
    elif kind in ROPE_SCALING_KEYS:
        used = ROPE_SCALING_KEYS[kind]
    else:
        raise BadInput(f"config.json {where}: RoPE scaling {shown(kind)} is not supported (default, linear, llama3)")
    for k, v in params.items():
        if k in ("rope_type", "type", "rope_theta", *used):
            continue
        if k == "partial_rotary_factor" and v in (1, 1.0):
            continue
        raise BadInput(f"config.json {where}.{k}={shown(v)} is not supported (RoPE {kind})")
    if kind == "default":
        return theta, None
    missing = [k for k in used if k not in params]
    if missing:
        raise BadInput(f"config.json {where}: RoPE {kind} needs {missing[0]}")
    rs = {"rope_type": kind, **{k: params[k] for k in used}}
    try:
        check_rope_scaling(rs)
    except ValueError as e:
        raise BadInput(f"config.json {where}: {e}") from None
    return theta, rs


def _rope(hf: dict) -> tuple[float, dict | None, float | None, dict | None]:
    """(theta, scaling, local theta, local scaling) from either spelling: v4's rope_theta + rope_scaling
    (+ Gemma's rope_local_base_freq) or v5's rope_parameters (one set, or one per layer type)."""
    params = _obj(hf, "rope_parameters")
    per_type = "full_attention" in params or "sliding_attention" in params
    if per_type:
        for k in params:
            if k not in ("full_attention", "sliding_attention"):
                raise BadInput(f"config.json rope_parameters.{k}: unknown layer type")
        full, local = _obj(params, "full_attention"), params.get("sliding_attention")
    else:
        full, local = params, None
    v5 = _scaling(full, "rope_parameters") if full else None
    legacy = _obj(hf, "rope_scaling")
    v4 = _scaling(legacy, "rope_scaling") if legacy else None
    if v5 is not None and v4 is not None and v5[1] != v4[1]:
        raise BadInput("config.json rope_scaling and rope_parameters disagree: remove one of them")
    top = None if hf.get("rope_theta") is None else _positive("rope_theta", hf["rope_theta"])
    theta = v5[0] if v5 is not None and v5[0] is not None else top
    if top is not None and theta != top:
        raise BadInput(f"config.json rope_theta={shown(top)} disagrees with rope_parameters.rope_theta={theta}")
    theta = 10000.0 if theta is None else theta
    scaling = (v5 or v4 or (None, None))[1]
    local_theta, local_scaling = None, None
    if local is not None:
        local_theta, local_scaling = _scaling(_obj(params, "sliding_attention"), "rope_parameters.sliding_attention")
    elif hf.get("rope_local_base_freq") is not None:
        local_theta = _positive("rope_local_base_freq", hf["rope_local_base_freq"])
    return theta, scaling, local_theta, local_scaling


def _layer_types(hf: dict, family: str, n_layers: int) -> tuple[list | None, int | None]:
    """Per-layer "full"/"sliding" and the window (None, None: no sliding layer)."""
    window = hf.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise BadInput(f"config.json sliding_window={shown(window)} must be a positive integer or null")
    types = hf.get("layer_types")
    if types is None and window is None:
        return None, None
    if family in ("qwen2", "qwen3", "smollm3") and not hf.get("use_sliding_window", False):
        return None, None  # the window is declared but switched off
    if n_layers > MAX_LAYERS:  # before any per-layer list is built from it
        raise BadInput(f"config.json num_hidden_layers={n_layers} is beyond {MAX_LAYERS:,}")
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers:
            raise BadInput(f"config.json layer_types must list {n_layers} layer types, got {shown(types)}")
        names = {"full_attention": "full", "sliding_attention": "sliding"}
        bad = [t for t in types if t not in names]
        if bad:
            raise BadInput(
                f"config.json layer_types: {shown(bad[0])} is not supported (full_attention, sliding_attention)"
            )
        kinds = [names[t] for t in types]
    elif family == "gemma3":
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        kinds = ["full" if (i + 1) % pattern == 0 else "sliding" for i in range(n_layers)]
    elif family == "llama" and hf.get("architectures", [None])[0] == "MistralForCausalLM":
        kinds = ["sliding"] * n_layers
    elif family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        start = hf.get("max_window_layers", n_layers)
        kinds = ["sliding" if i >= start else "full" for i in range(n_layers)]
    else:
        kinds = ["full"] * n_layers
    if "sliding" in kinds and window is None:
        raise BadInput("config.json layer_types has sliding layers but sliding_window is null")
    if "sliding" not in kinds:
        return None, None
    return kinds, window


def teacher_config(hf: dict, max_seq_len: int) -> ModelConfig:
    """The training-graph config of an HF config dict; BadInput for what the graph cannot represent."""
    arch = _first(hf.get("architectures") or [None])
    if not isinstance(arch, (str, type(None))):
        raise BadInput(f"config.json architectures={shown(hf.get('architectures'))} must name a model class")
    if arch is None:  # no architectures list: the model_type says the family
        arch = MODEL_TYPES.get(hf.get("model_type")) if isinstance(hf.get("model_type"), str) else None
    if arch not in FAMILIES:
        shownarch = shown(arch if arch is not None else hf.get("model_type"))
        raise BadInput(f"unsupported architecture {shownarch} (supported: {', '.join(ARCHITECTURES)})")
    family = FAMILIES[arch]
    for key, neutral in NEUTRAL.items():
        if (
            key in hf
            and not any(hf[key] == n and type(hf[key]) is type(n) for n in neutral if n is not None)
            and not (hf[key] is None and None in neutral)
        ):
            raise BadInput(f"config.json {key}={shown(hf[key])} is not supported by the PIT graph")
    act_key = "hidden_activation" if family in GEMMA else "hidden_act"
    act = hf.get(act_key, "gelu_pytorch_tanh" if family in GEMMA else "silu")
    if act not in ACTS:
        raise BadInput(f"config.json {act_key}={shown(act)} is not supported ({', '.join(ACTS)})")
    theta, scaling, local_theta, local_scaling = _rope(hf)
    if local_scaling is not None:
        raise BadInput(
            f"config.json: RoPE scaling {shown(local_scaling['rope_type'])} on sliding layers is not supported"
        )
    if family in GEMMA and hf.get("attn_logit_softcapping") is not None:
        # transformers' Gemma 3 never applies it: honouring it would not reproduce the model
        raise BadInput(
            f"config.json attn_logit_softcapping={shown(hf['attn_logit_softcapping'])} is not applied by Gemma 3"
        )

    def num(key: str, kind=int, default=None, value=None):
        """hf[key] of its JSON type (an int, or for floats an int or float), never a bool, string or null."""
        v = hf.get(key, default) if value is None else value
        if v is None:
            raise BadInput(f"config.json has no {key}")
        if isinstance(v, bool) or not isinstance(v, (int,) if kind is int else (int, float)):
            raise BadInput(f"config.json {key}={shown(v)} must be {'an integer' if kind is int else 'a number'}")
        return kind(v)

    def opt(key: str, kind=float):
        return None if hf.get(key) is None else num(key, kind)

    def flag(key: str) -> bool:
        v = hf.get(key, False)
        if not isinstance(v, bool):
            raise BadInput(f"config.json {key}={shown(v)} must be true or false")
        return v

    heads = num("num_attention_heads")
    kv = hf.get("num_key_value_heads")
    dim, n_layers = num("hidden_size"), num("num_hidden_layers")
    head_size = opt("head_dim", int)
    if head_size is not None and not 0 < head_size <= 1 << 16:
        raise BadInput(f"config.json head_dim={shown(head_size)} must be within 1..65,536")
    seq = min(max_seq_len, num("max_position_embeddings", default=max_seq_len))
    layer_types, window = _layer_types(hf, family, n_layers)
    if layer_types is not None and window >= seq and local_theta is None:
        layer_types, window = None, None  # every window covers the context: full attention
    attention_bias = flag("attention_bias")
    nope = []
    if family == "smollm3":
        flags = hf.get("no_rope_layers")
        if n_layers > MAX_LAYERS:
            raise BadInput(f"config.json num_hidden_layers={n_layers} is beyond {MAX_LAYERS:,}")
        if flags is None:
            every = num("no_rope_layer_interval", default=4)
            flags = [int((i + 1) % every != 0) for i in range(n_layers)]
        if not isinstance(flags, list) or len(flags) < n_layers or any(f not in (0, 1) for f in flags[:n_layers]):
            raise BadInput(f"config.json no_rope_layers must flag each of {n_layers} layers 0 or 1, got {shown(flags)}")
        nope = [i for i in range(n_layers) if not flags[i]]
    qpas = opt("query_pre_attn_scalar") if family in GEMMA else None
    try:
        cfg = ModelConfig(
            vocab_size=num("vocab_size"),
            dim=dim,
            n_layers=n_layers,
            n_heads=heads,
            n_kv_heads=heads if kv is None else num("num_key_value_heads"),
            ffn_dim=num("intermediate_size"),
            max_seq_len=seq,
            rope_theta=theta,
            norm_eps=num("rms_norm_eps", float, 1e-6),
            tying="tied" if hf.get("tie_word_embeddings", family in GEMMA) is True else "untied",
            bos_id=num("bos_token_id", value=_first(hf.get("bos_token_id"))),
            eos_id=num("eos_token_id", value=_first(hf.get("eos_token_id"))),
            head_size=None if head_size in (None, dim // heads) and dim % heads == 0 else head_size,
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=flag("mlp_bias"),
            qk_norm=family in ("qwen3", "gemma3"),
            sandwich_norm=family in GEMMA,
            hidden_act=ACTS[act],
            embed_scale=float(dim) ** 0.5 if family in GEMMA else 1.0,
            attn_scale=None if qpas is None else qpas**-0.5,
            rope_scaling=scaling,
            sliding_window=window,
            layer_types=layer_types,
            rope_local_theta=local_theta if layer_types is not None else None,
            nope_layers=nope,
            final_softcap=opt("final_logit_softcapping"),
            attn_softcap=None if family in GEMMA else opt("attn_logit_softcapping"),
        )
    except (TypeError, ValueError) as e:
        raise BadInput(f"config.json: {e}") from None
    try:
        cfg.validate()
    except ValueError as e:
        raise BadInput(f"config.json: {e}") from None
    return cfg


def hf_family(hf: dict) -> str:
    arch = _first(hf.get("architectures") or [None]) or MODEL_TYPES.get(hf.get("model_type"))
    return FAMILIES.get(arch, "llama")


PER_LAYER = {  # training-graph name -> HF name, inside layers.N
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention.q_norm": "self_attn.q_norm",
    "attention.k_norm": "self_attn.k_norm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
SANDWICH = {  # Gemma 3: post_attention_layernorm is the norm after attention, the FFN has its own pre-norm
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffn_norm": "post_feedforward_layernorm",
}
GLOBAL = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
HF_KEYS = {  # training-graph config field -> HF config key, for messages
    "n_layers": "num_hidden_layers",
    "dim": "hidden_size",
    "ffn_dim": "intermediate_size",
    "n_kv_heads": "num_key_value_heads",
}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_OUR_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def _per_layer(cfg: ModelConfig | None) -> dict[str, str]:
    return {**PER_LAYER, **SANDWICH} if cfg is not None and cfg.sandwich_norm else PER_LAYER


def hf_name(ours: str, cfg: ModelConfig | None = None) -> str:
    """Training-graph tensor name -> the HF checkpoint's."""
    if m := _OUR_LAYER.match(ours):
        part = m.group(2)
        return f"model.layers.{m.group(1)}.{_per_layer(cfg).get(part, part)}.{m.group(3)}"
    return {**GLOBAL, "output.weight": "lm_head.weight"}.get(ours, ours)


def our_name(theirs: str, cfg: ModelConfig | None = None) -> str | None:
    """HF tensor name -> the training graph's (None: a tensor the graph has no use for)."""
    if m := _HF_LAYER.match(theirs):
        ours = {v: k for k, v in _per_layer(cfg).items()}.get(m.group(2))
        return f"layers.{m.group(1)}.{ours or 'hf:' + m.group(2)}.{m.group(3)}"
    inv = {v: k for k, v in GLOBAL.items()} | {"lm_head.weight": "output.weight"}
    return inv.get(theirs)


def tensor_names(cfg: ModelConfig) -> dict[str, str]:
    """Training-graph tensor name -> HF tensor name (the teacher's checkpoint state)."""
    return {ours: hf_name(ours, cfg) for ours in expected_shapes(cfg)}


# ---------------------------------------------------------------- reading the folder


def _weight_files(src: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file holding it (single file or sharded with an index), from the headers only."""
    return {name: f for f, header in _headers(src).items() for name in header}


def _headers(src: Path) -> dict[Path, checkpoint.Header]:
    """Each weight file's safetensors header (no tensor data read): the files the index names, or every
    *.safetensors in the folder."""
    if (src / HF_INDEX).is_file():
        index = checkpoint.read_json(src / HF_INDEX, "weight index", 64 << 20)
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(f, str) for f in wmap.values()):
            raise BadInput(f"{src / HF_INDEX}: unreadable index (no weight_map of file names)")
        files = sorted({src / f for f in wmap.values()})
    else:
        files = sorted(src.glob("*.safetensors"))
    if not files:
        if any(src.glob("*.bin")) or any(src.glob("*.pt")):
            raise BadInput(
                f"{src}: only pickle weights (*.bin/*.pt) found; they are never loaded, convert to safetensors"
            )
        raise BadInput(f"{src}: no *.safetensors weights")
    out = {}
    for f in files:
        if not f.is_file():
            raise BadInput(f"{src / HF_INDEX}: names {f.name}, which is missing")
        out[f] = checkpoint.read_header(f)
    return out


def check_teacher_header(src: Path, cfg: ModelConfig, roles: dict[str, str] | None = None) -> None:
    """The HF config against its weights' headers (names, shapes, dtypes), before any tensor is read. `roles`: the
    PIT tensors of a PIT model in HF layout (pit_tensors)."""
    ours: checkpoint.Header = {}
    for header in _headers(src).values():
        for name, entry in header.items():
            if (n := our_name(name, cfg)) is not None:
                ours[n] = entry
            if roles and name in (roles["z"], roles.get("l"), roles.get("l_strict")):
                ours["pit.z" if name == roles["z"] else "pit.l"] = entry
    if cfg.tying == "tied":
        ours.pop("output.weight", None)  # some tied checkpoints store the head too; the graph reads the table
    checkpoint.check_header(cfg, ours, f"{src / HF_CONFIG}", HF_KEYS, strict=False, label=lambda n: hf_name(n, cfg))


def _open(f: Path):
    try:
        return safe_open(str(f), framework="pt")
    except Exception as e:  # SafetensorError is not an OSError
        raise BadInput(f"{f}: unreadable safetensors ({str(e).splitlines()[0]})") from None


def read_tensors(src: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The teacher's tensors under training-graph names, fp32, one tensor in memory at a time beyond the result.
    `cfg` comes from read_config, which checked it against the weights' headers. A PIT config reads the body only
    (Z and L: read_pit)."""
    where = _weight_files(src)
    family = hf_family(checkpoint.read_json(src / HF_CONFIG))
    handles: dict[Path, object] = {}
    out = {}
    for ours, theirs in tensor_names(cfg).items():
        if ours.startswith("pit."):
            continue
        f = where[theirs]
        h = handles.get(f) or handles.setdefault(f, _open(f))
        t = h.get_tensor(theirs).float()
        bad = (~torch.isfinite(t)).sum().item()
        if bad:
            raise BadInput(f"tensor {theirs} has {bad} non-finite values")
        if family in GEMMA and ours.endswith("norm.weight"):
            t = 1.0 + t  # Gemma's RMSNorm multiplies by (1 + w), in fp32 as here: the gain itself is stored
        out[ours] = t
    return out


# ---------------------------------------------------------------- a PIT model in HF layout (Z and L kept)

PIT_ROLES = {  # role -> the names a folder's tensor is found by (flags name any other)
    "z": ("pit.z", "model.pit.z"),
    "l": ("pit.l", "model.pit.l"),
    "l_strict": ("pit.l_strict", "model.pit.l_strict"),
    "l_log_diag": ("pit.l_log_diag", "model.pit.l_log_diag"),
}


def pit_tensors(src: Path, names: dict[str, str] | None = None) -> dict[str, str] | None:
    """The folder's PIT tensors by role (z, and l or l_strict + l_log_diag): the names given (flags), else found by
    their usual names. None: no PIT tensor, a tied or untied teacher."""
    have = set(_weight_files(src))
    names = {k: v for k, v in (names or {}).items() if v}
    for role, name in names.items():
        if name not in have:
            raise BadInput(f"{src}: no tensor {shown(name)} (--pit-{role.replace('_', '-')})")
    roles = names or {r: n for r, cands in PIT_ROLES.items() if (n := next((c for c in cands if c in have), None))}
    if not roles:
        return None
    if "l" in roles and ({"l_strict", "l_log_diag"} & set(roles)):
        raise BadInput(f"{src}: L is given twice (pit.l and pit.l_strict/l_log_diag): name one with --pit-l")
    if "z" not in roles or not ("l" in roles or {"l_strict", "l_log_diag"} <= set(roles)):
        raise BadInput(
            f"{src}: PIT tensors incomplete ({', '.join(sorted(roles.values()))}): need Z and L "
            "(pit.l, or pit.l_strict + pit.l_log_diag)"
        )
    return roles


def check_pit_header(src: Path, cfg: ModelConfig, roles: dict[str, str]) -> None:
    """Shapes of Z and L (either convention) against the config, from the headers."""
    entries = {name: entry for header in _headers(src).values() for name, entry in header.items()}
    d, V = cfg.dim, cfg.vocab_size
    want = {"z": (V, d), "l": (d, d), "l_strict": (d, d), "l_log_diag": (d,)}
    for role, name in roles.items():
        dtype, shape = entries[name]
        if tuple(shape) != want[role]:
            raise BadInput(f"tensor {name} has shape {list(shape)}, config.json implies {list(want[role])}")
        if dtype not in ("F32", "F16", "BF16", "F64"):
            raise BadInput(f"tensor {name} has dtype {dtype}, expected a float dtype")


def read_pit(src: Path, roles: dict[str, str]) -> dict[str, torch.Tensor]:
    """pit.z and pit.l (the factor) from the folder, in fp32; L assembled from strict-lower + log-diagonal if so
    given. The invariants are checked by the caller (checkpoint.check_tensors)."""
    where = _weight_files(src)

    def get(name):
        return _open(where[name]).get_tensor(name).float()

    z = get(roles["z"])
    if "l" in roles:
        l = get(roles["l"])
    else:
        strict, log_diag = get(roles["l_strict"]), get(roles["l_log_diag"])
        stray = torch.triu(strict).abs().max().item()
        if stray > 0:
            raise BadInput(f"tensor {roles['l_strict']} has entries on or above the diagonal (max {stray:.3g})")
        l = torch.tril(strict, -1) + torch.diag(log_diag.double().exp().float())
    return {"pit.z": z, "pit.l": l}


def read_tokenizer(src: Path, cfg: ModelConfig) -> Tokenizer:
    try:
        return checkpoint.read_tokenizer(src, cfg.vocab_size)
    except CheckpointError as e:  # the teacher folder is bad input like any other
        raise BadInput(str(e)) from None


def read_config(src: Path, max_seq_len: int, pit_names: dict | bool | None = False) -> ModelConfig:
    """The training-graph config of an HF folder, checked against its weights' headers. pit_names: False, a teacher
    (tied or untied) whatever the folder holds; None or names: a PIT model in HF layout where Z and L are there."""
    if not src.is_dir():
        raise BadInput(f"{src}: not a folder")
    if not (src / HF_CONFIG).is_file():
        raise BadInput(f"{src}: {HF_CONFIG} missing")
    hf = checkpoint.read_json(src / HF_CONFIG)
    if not isinstance(hf, dict):
        raise BadInput(f"{src / HF_CONFIG}: expected a JSON object, got {type(hf).__name__}")
    cfg = teacher_config(hf, max_seq_len)
    roles = pit_tensors(src, pit_names) if pit_names is not False else None
    if roles is not None:  # a PIT model in HF layout: Z and L instead of a table
        cfg = pit_config(cfg)
        check_pit_header(src, cfg, roles)
    check_teacher_header(src, cfg, roles)  # before anything is sized from it
    return cfg


# ---------------------------------------------------------------- models from tensors (shared, no copies)


def polar_rows(rows, V: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin polar decomposition A = U H of a V x d table given by row chunks rows(slice), in float64 chunks:
    H^2 = A^T A = Q diag(s^2) Q^T (a d x d Gram accumulated over chunks), U = A Q diag(1/s) Q^T, stored fp32.
    Returns (U fp32, singular values s, Q). No V x d float64 table, no SVD workspace: memory stays at the fp32 U.
    Squaring the condition number costs float64 accuracy ~cond(A)^2 * 1e-16, far below fp32 storage for any usable
    table; the rank check refuses tables where it would not be."""
    chunks = vocab_chunks(V)
    G = torch.zeros(d, d, dtype=torch.float64)
    for c in chunks:
        a = rows(c).double()
        G += a.T @ a
    w, Q = torch.linalg.eigh(G)
    if w.min() <= w.max() * 1e-12:  # cond(A) >= 1e6: not an embedding table PIT can tie through
        raise BadInput(
            f"embedding table is (nearly) rank-deficient: singular values {w.min().sqrt():.3g} .. {w.max().sqrt():.3g}"
        )
    s = w.sqrt()
    h_inv = (Q / s) @ Q.T
    return torch.cat([(rows(c).double() @ h_inv).float() for c in chunks]), s, Q


def pit_state(cfg: ModelConfig, teacher: dict[str, torch.Tensor], init: str) -> tuple[dict, dict]:
    """PIT checkpoint tensors from the teacher's tensors, and stats of the decomposition.

    The body and final norm are the teacher's tensors themselves; only Z and L are new."""
    if init not in INITS:
        raise BadInput(f"--init must be one of {INITS}, got {init!r}")
    E0 = teacher["tok_embeddings.weight"]
    W0 = teacher.get("output.weight", E0)
    rows = {"identity": lambda c: E0[c].double() + W0[c].double(), "input": lambda c: E0[c], "output": lambda c: W0[c]}
    Z, s, Q = polar_rows(rows[init], cfg.vocab_size, cfg.dim)
    if init == "identity":
        T = torch.eye(cfg.dim, dtype=torch.float64)
    else:  # H = Q diag(s) Q^T. input: T = H^-1 so Z T^-1 = Z H = E0; output: T = H so T Z^T = H Z^T = W0^T
        T = (Q * (s if init == "output" else 1.0 / s)) @ Q.T
    L = torch.linalg.cholesky((T + T.T) / 2)
    state = {k: v for k, v in teacher.items() if k not in ("tok_embeddings.weight", "output.weight")}
    state["pit.z"], state["pit.l"] = Z, L.float()
    ev = torch.linalg.eigvalsh(T)
    stats = {"cond_T": (ev.max() / ev.min()).item(), "cond_table": (s.max() / s.min()).item()}
    return state, stats


def pit_config(cfg: ModelConfig) -> ModelConfig:
    return ModelConfig(**{**asdict(cfg), "tying": "pit", "train_z": False})


# ---------------------------------------------------------------- teacher vs PIT


@torch.no_grad()
def compare(teacher: Transformer, student: Transformer, windows: torch.Tensor) -> dict[str, float]:
    """KL(teacher || student) per position (mean, p99), top-1 agreement and both perplexities. One window at a time,
    float64 in chunks of positions: at V = 49152 a window's float64 log-probabilities alone are 100 MB each."""
    # results preallocated: small tensors appended between the large temporaries fragment the heap (measured)
    kl, top1, nll_t, nll_s = (torch.empty(windows.shape[0], windows.shape[1] - 1, dtype=torch.float64) for _ in "1234")
    for i, w in enumerate(windows):
        logits_t, logits_s = teacher(w[None, :-1])[0], student(w[None, :-1])[0]
        for r in range(0, len(w) - 1, POS_CHUNK):
            lt = F.log_softmax(logits_t[r : r + POS_CHUNK].double(), -1)
            ls = F.log_softmax(logits_s[r : r + POS_CHUNK].double(), -1)
            rows, nxt = slice(r, r + len(lt)), w[1:][r : r + POS_CHUNK, None]
            kl[i, rows] = (lt.exp() * (lt - ls)).sum(-1)
            top1[i, rows] = (lt.argmax(-1) == ls.argmax(-1)).double()
            nll_t[i, rows] = -lt.gather(-1, nxt)[:, 0]
            nll_s[i, rows] = -ls.gather(-1, nxt)[:, 0]
        del logits_t, logits_s
    kl = kl.flatten()
    return {
        "kl_mean": kl.mean().item(),
        "kl_p99": torch.quantile(kl, 0.99).item(),
        "top1": top1.mean().item(),
        "ppl_teacher": math.exp(nll_t.mean().item()),
        "ppl_pit": math.exp(nll_s.mean().item()),
        "positions": kl.numel(),
    }


def heldout(tok: Tokenizer, cfg: ModelConfig, n_windows: int) -> torch.Tensor:
    """n_windows held-out windows spread over the split (as validation picks them), [n, max_seq_len]."""
    from pit_export.models.train import heldout_windows

    w = heldout_windows(tok, cfg)
    if len(w) == 0:
        raise BadInput(f"the held-out text gives no window of {cfg.max_seq_len} tokens; lower --max-seq-len")
    pick = torch.linspace(0, len(w) - 1, min(n_windows, len(w))).round().long()
    return w[pick]


# ---------------------------------------------------------------- the command


def import_hf(
    src: Path,
    out: Path,
    init: str = "output",
    max_seq_len: int = 512,
    n_windows: int = 4,
    progress=print,
    force: bool = False,
    eval_text: Path | None = None,
    pit_names: dict[str, str | None] | None = None,
) -> ImportReport:
    """A tied or untied teacher as PIT (polar decomposition, --init), with KL(teacher || PIT) on the evaluation text;
    or, where the folder holds Z and L (pit_tensors), that PIT model itself, checked and kept."""
    src = Path(src)
    cfg = read_config(src, max_seq_len, pit_names or None)
    roles = pit_tensors(src, pit_names) if cfg.tying == "pit" else None
    tok = read_tokenizer(src, cfg)
    windows = eval_windows(tok, cfg, n_windows, eval_text)  # before the weights: a short text fails now
    text = "held-out split" if eval_text is None else f"{eval_text} (sha256 {text_source(str(eval_text))['sha256']})"
    if roles is not None:
        return _import_pit(src, out, cfg, roles, tok, windows, text, progress, force)
    progress(f"reading {cfg.tying} teacher: {cfg.n_layers} layers, {cfg.vocab_size} x {cfg.dim}")
    tensors = read_tensors(src, cfg)
    progress(f"polar decomposition ({init})")
    state, stats = pit_state(cfg, tensors, init)
    teacher, pit = (
        Transformer.from_checkpoint_state(cfg, tensors),
        Transformer.from_checkpoint_state(pit_config(cfg), state),
    )
    del tensors, state
    from pit_export.models.checkpoint import orthonormality_error

    ortho = orthonormality_error(pit.pit.z)
    progress("teacher vs PIT on " + ("held-out text" if eval_text is None else str(eval_text)))
    cmp = compare(teacher, pit, windows)
    report = ImportReport(str(src), init, cfg.tying, ortho_err_max=ortho, **stats, **cmp, eval_text=text)
    del teacher
    save_checkpoint(out, pit, tok, {"import_report.json": json.dumps(asdict(report), indent=2)}, force=force)
    return report


def _import_pit(src, out, teacher_cfg, roles, tok, windows, text, progress, force) -> ImportReport:
    """A PIT model trained elsewhere, in HF layout: body as any family's, Z and L as stored (either convention),
    its invariants checked (Z^T Z = I, L lower-triangular with a positive diagonal, cond(T)); nothing re-initialised."""
    cfg = teacher_cfg
    progress(f"reading PIT model: {cfg.n_layers} layers, Z {cfg.vocab_size} x {cfg.dim} ({', '.join(roles.values())})")
    state = read_tensors(src, cfg) | read_pit(src, roles)
    try:
        ortho = checkpoint.check_tensors(cfg, state)
    except CheckpointError as e:
        raise BadInput(f"{src}: {e}") from None
    L = state["pit.l"].double()
    ev = torch.linalg.eigvalsh(L @ L.T)
    pit = Transformer.from_checkpoint_state(cfg, state)
    del state
    progress("held-out perplexity" if text == "held-out split" else f"perplexity on {text}")
    ppl = compare(pit, pit, windows)
    report = ImportReport(
        str(src), "kept", "pit", (ev.max() / ev.min()).item(), 1.0, ortho, None, None, None, None,
        ppl["ppl_pit"], ppl["positions"], text,
    )  # fmt: skip
    save_checkpoint(out, pit, tok, {"import_report.json": json.dumps(asdict(report), indent=2)}, force=force)
    return report


def eval_windows(tok: Tokenizer, cfg: ModelConfig, n_windows: int, text: Path | None) -> torch.Tensor:
    """n_windows windows of the evaluation text: the held-out split (spread over it) or the user's file."""
    if text is None:
        return heldout(tok, cfg, n_windows)
    from pit_export.models.train import text_windows

    try:
        w = text_windows(tok, cfg, text, n_windows)
    except ValueError as e:
        raise BadInput(str(e)) from None
    pick = torch.linspace(0, len(w) - 1, min(n_windows, len(w))).round().long()
    return w[pick]

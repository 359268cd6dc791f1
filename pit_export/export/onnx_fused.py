"""The onnx-cpu decoder written op by op with ONNX Runtime's fused contrib ops, as onnxruntime-genai's model builder
writes its own: one node per job instead of a traced graph.

Per layer:
    SkipSimplifiedLayerNormalization   residual + previous block's output, RMSNorm; the sum is carried to the next
    MatMul (q | k | v packed)          one weight [d, (H + 2 H_kv) hd]
    GroupQueryAttention                RoPE inside (half-split layout, cos/sin tables [max_seq_len, hd / 2]),
                                       grouped heads, causal; the KV cache is one buffer per layer shared between past
                                       and present (written in place at the positions the attention mask implies)
    MatMul (o)
    SkipSimplifiedLayerNormalization
    MatMul (gate | up packed) -> Split -> QuickGelu(alpha 1) = SiLU -> Mul -> MatMul (down)

The PIT interface is the traced graph's (onnx.py): in the compact layouts one V x d table, read by the gather
(Transpose of the head weight in fp32; GatherBlockQuantized over the head's MatMulNBits weight once quantized) and by
the head, with the d x d transforms as their own MatMuls: embed_proj (T^-1) after the gather, head_proj (diag(g) T)
before the head. The interface tensors carry onnx.py's names (embeddings, final_hidden, logits), so its quantizer,
probes and mobile-format conversion apply unchanged. The final RMSNorm has no gain: it is folded into the head.

Inputs: input_ids [b, s], attention_mask [b, total] (int64), past_key_values.{i}.key/value [b, H_kv, max, hd];
outputs: logits [b, s, V], present.{i}.key/value (the same buffers when bound in place, as onnxruntime-genai does with
past_present_share_buffer). GroupQueryAttention reads the positions from the mask: seqlens_k = sum(mask) - 1,
total_sequence_length = mask.shape[1]; new tokens sit at total - s .. total - 1.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pit_export.decoder import FoldedWeights
from pit_export.models.pit import ModelConfig, rope_tables

MS = "com.microsoft"
OPSET = 18  # onnx.py's; the contrib ops are com.microsoft version 1
# ModelConfig fields this graph implements; any other field must hold its dataclass default
PLAIN_LLAMA = {
    "vocab_size",
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "ffn_dim",
    "max_seq_len",
    "rope_theta",
    "norm_eps",
    "tying",
    "train_z",
    "bos_id",
    "eos_id",
}


def fused_supports(cfg: ModelConfig) -> bool:
    """True when `cfg` is a plain Llama decoder: every field outside PLAIN_LLAMA at its default (a field added to
    ModelConfig later counts as unsupported until this graph implements it)."""
    for f in dataclasses.fields(ModelConfig):
        if f.name in PLAIN_LLAMA:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            return False
        if getattr(cfg, f.name) != default:
            return False
    return True


def kv_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return past, [p.replace("past_key_values", "present") for p in past]


class _Graph:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def init(self, name: str, array) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> list[str]:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs


def _w(fw: FoldedWeights, name: str) -> np.ndarray:
    return fw.tensors[name].detach().float().numpy()


def fp32_graph(fw: FoldedWeights, names: dict[str, str]) -> onnx.ModelProto:
    """The fused decoder in fp32, weights inside the proto. `names` gives the interface tensors' names (onnx.py's
    EMB_OUT, HEAD_IN, LOGITS, HEAD_W)."""
    cfg, layout = fw.cfg, fw.layout
    d, hd, V, L = cfg.dim, cfg.head_dim, cfg.vocab_size, cfg.n_layers
    emb_out, head_in, logits, head_w = names["EMB_OUT"], names["HEAD_IN"], names["LOGITS"], names["HEAD_W"]
    g = _Graph()

    # GroupQueryAttention's view of the mask: seqlens_k = valid length - 1 per row, total = the mask's width
    one = g.init("one_i64", np.array([1], np.int64))
    axis1 = g.init("axis_1", np.array([1], np.int64))
    (mask_sum,) = g.node("ReduceSum", ["attention_mask", axis1], ["mask_sum"], "mask/ReduceSum", keepdims=0)
    (seqlens64,) = g.node("Sub", [mask_sum, one], ["seqlens_k_i64"], "mask/Sub")
    (seqlens_k,) = g.node("Cast", [seqlens64], ["seqlens_k"], "mask/Cast_seqlens", to=TensorProto.INT32)
    (total64,) = g.node("Shape", ["attention_mask"], ["total_len_i64"], "mask/Shape", start=1, end=2)
    (total,) = g.node("Cast", [total64], ["total_sequence_length"], "mask/Cast_total", to=TensorProto.INT32)
    cos, sin = (t.numpy() for t in rope_tables(cfg))  # [max_seq_len, hd / 2] each: stored once, read by every layer
    cos_cache, sin_cache = g.init("cos_cache", cos), g.init("sin_cache", sin)

    # embedding
    if layout == "untied":
        table = g.init("tok_embeddings.weight", _w(fw, "tok_embeddings.weight"))
        g.init(head_w, _w(fw, "output.weight").T)
    else:  # one table: the head's d x V weight, its transpose gathered (the quantizer turns both into one 4-bit table)
        g.init(head_w, _w(fw, "table.weight").T)
        (table,) = g.node("Transpose", [head_w], ["table"], "embed/Transpose", perm=[1, 0])
    if layout == "shared-z":
        (rows,) = g.node("Gather", [table, "input_ids"], ["table_rows"], "embed/Gather", axis=0)
        proj = g.init("embed_proj.weight", _w(fw, "embed_proj.weight").T)
        g.node("MatMul", [rows, proj], [emb_out], "embed/embed_proj/MatMul")
    else:
        g.node("Gather", [table, "input_ids"], [emb_out], "embed/Gather", axis=0)

    past, present = kv_names(L)
    residual, delta = emb_out, None
    attrs = dict(
        num_heads=cfg.n_heads,
        kv_num_heads=cfg.n_kv_heads,
        scale=1.0 / math.sqrt(hd),
        local_window_size=-1,
        softcap=0.0,
        do_rotary=1,
        rotary_interleaved=0,
    )
    for i in range(L):
        p = f"layers.{i}"
        residual, x = _norm(g, f"{p}/attention_norm", residual, delta, _w(fw, f"{p}.attention_norm"), cfg.norm_eps)
        qkv = np.concatenate([_w(fw, f"{p}.attention.{w}.weight") for w in ("wq", "wk", "wv")]).T
        (qkv,) = g.node("MatMul", [x, g.init(f"{p}.attention.qkv.weight", qkv)], [f"{p}/qkv"], f"{p}/qkv/MatMul")
        gqa_in = [qkv, "", "", past[2 * i], past[2 * i + 1], seqlens_k, total, cos_cache, sin_cache]
        outs = [f"{p}/attention", present[2 * i], present[2 * i + 1]]
        (att, *_) = g.node("GroupQueryAttention", gqa_in, outs, f"{p}/GroupQueryAttention", MS, **attrs)
        wo = g.init(f"{p}.attention.wo.weight", _w(fw, f"{p}.attention.wo.weight").T)
        (delta,) = g.node("MatMul", [att, wo], [f"{p}/attention_out"], f"{p}/wo/MatMul")
        residual, x = _norm(g, f"{p}/ffn_norm", residual, delta, _w(fw, f"{p}.ffn_norm"), cfg.norm_eps)
        w13 = np.concatenate([_w(fw, f"{p}.feed_forward.w1.weight"), _w(fw, f"{p}.feed_forward.w3.weight")]).T
        (h13,) = g.node("MatMul", [x, g.init(f"{p}.feed_forward.w13.weight", w13)], [f"{p}/w13"], f"{p}/w13/MatMul")
        gate, up = g.node("Split", [h13], [f"{p}/gate", f"{p}/up"], f"{p}/Split", axis=-1, num_outputs=2)
        (act,) = g.node("QuickGelu", [gate], [f"{p}/silu"], f"{p}/SiLU", MS, alpha=1.0)  # x sigmoid(x)
        (h,) = g.node("Mul", [act, up], [f"{p}/gated"], f"{p}/Mul")
        w2 = g.init(f"{p}.feed_forward.w2.weight", _w(fw, f"{p}.feed_forward.w2.weight").T)
        (delta,) = g.node("MatMul", [h, w2], [f"{p}/ffn_out"], f"{p}/w2/MatMul")

    # final RMSNorm (gain folded into the head: a ones weight) and head
    g.node(
        "SkipSimplifiedLayerNormalization",
        [residual, delta, g.init("norm.ones", np.ones(d, np.float32))],
        [head_in],
        "final_norm/SkipSimplifiedLayerNormalization",
        MS,
        epsilon=cfg.norm_eps,
    )
    h = head_in
    if layout != "untied":
        proj = g.init("head_proj.weight", _w(fw, "head_proj.weight").T)
        (h,) = g.node("MatMul", [h, proj], ["head_proj"], "head/head_proj/MatMul")
    g.node("MatMul", [h, head_w], [logits], "head/MatMul")

    fp = TensorProto.FLOAT
    kv = ["batch", cfg.n_kv_heads, "max_sequence_length", hd]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence_length"]),
        *(helper.make_tensor_value_info(n, fp, kv) for n in past),
    ]
    outputs = [
        helper.make_tensor_value_info(logits, fp, ["batch", "sequence_length", V]),
        *(helper.make_tensor_value_info(n, fp, kv) for n in present),
    ]
    graph = helper.make_graph(g.nodes, "pit_decoder", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9, producer_name="pit-export")


def _norm(g: _Graph, name: str, residual: str, delta: str | None, weight: np.ndarray, eps: float) -> tuple[str, str]:
    """RMSNorm of residual (+ delta): (the new residual, the normed input). The first layer has no delta."""
    w = g.init(f"{name.replace('/', '.')}.weight", weight)
    if delta is None:
        (x,) = g.node("SimplifiedLayerNormalization", [residual, w], [f"{name}/out"], name, axis=-1, epsilon=eps)
        return residual, x
    x, _, _, s = g.node(
        "SkipSimplifiedLayerNormalization",
        [residual, delta, w],
        [f"{name}/out", "", "", f"{name}/residual"],
        f"{name}/SkipSimplifiedLayerNormalization",
        MS,
        epsilon=eps,
    )
    return s, x

"""The onnx-cpu decoder written op by op with ONNX Runtime's fused contrib ops, as onnxruntime-genai's model builder
writes its own: one node per job instead of a traced graph.

Per layer:
    SkipSimplifiedLayerNormalization   residual + previous block's output, RMSNorm; the sum is carried to the next
    MatMul (q | k | v packed) [+ Add]  one weight [d, (H + 2 H_kv) hd]; the q/k/v biases (Qwen2) as one Add
    GroupQueryAttention                RoPE inside (half-split layout, cos/sin tables [max_seq_len, hd / 2], scaled
                                       RoPE included), grouped heads, causal; the KV cache is one buffer per layer
                                       shared between past and present (written in place at the positions the
                                       attention mask implies)
    MatMul (o) [+ Add]
    SkipSimplifiedLayerNormalization
    MatMul (gate | up packed) [+ Add] -> Split -> QuickGelu(alpha 1) = SiLU -> Mul -> MatMul (down) [+ Add]

The PIT interface is the traced graph's (onnx.py): in the compact layouts one V x d table, read by the gather
(Transpose of the head weight in fp32; GatherBlockQuantized over the head's MatMulNBits weight once quantized) and by
the head, with the d x d transforms as their own MatMuls: embed_proj (T^-1) after the gather, head_proj (diag(g) T)
before the head. The interface tensors carry onnx.py's names (embeddings, final_hidden, logits), so its probes and
mobile-format conversion apply unchanged. The final RMSNorm has no gain: it is folded into the head.

Quantized schemes are quantized here, weight by weight, as the graph is written (`Precision`): each weight goes
through onnxruntime's own MatMulNBits quantizer (DefaultWeightOnlyQuantizer, the code onnx.quantize runs over a whole
graph) and is written to the data file at once, so no fp32 copy of the model is ever held as a proto. The result is
onnx.quantize's graph, initializer for initializer (tests/test_onnx_fused.py checks it).

Inputs: input_ids [b, s], attention_mask [b, total] (int64), past_key_values.{i}.key/value [b, H_kv, max, hd],
optionally logits_from [1] (default -1: the head computes the last position's logits only; 0: every position);
outputs: logits [b, 1, V] (by default), present.{i}.key/value (the same buffers when bound in place, as
onnxruntime-genai does with past_present_share_buffer). GroupQueryAttention reads the positions from the mask:
seqlens_k = sum(mask) - 1, total_sequence_length = mask.shape[1]; new tokens sit at total - s .. total - 1.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from pit_export.decoder import FoldedWeights
from pit_export.models.pit import ModelConfig, rope_tables

MS = "com.microsoft"
OPSET = 18  # onnx.py's; the contrib ops are com.microsoft version 1
# ModelConfig fields this graph implements; any other field must hold its dataclass default
IMPLEMENTED = {
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
    "head_size",  # GroupQueryAttention reads the head size from the packed width
    "qkv_bias",
    "o_bias",
    "mlp_bias",
    "rope_scaling",  # in the cos/sin tables (rope_tables)
    "attn_scale",  # GroupQueryAttention's scale
}
KEEP = "logits_from"  # an overridable input: the first position that gets logits, Python-style (keep_rows)
ROWS = "final_hidden_rows"  # the final norm's output for every position, before keep_rows
INLINE_BELOW = 1024  # bytes: smaller tensors stay in the proto (onnx.py's save_external rule)
CHUNK = 4096  # output columns (or table rows) quantized or written at a time: bounds the transient copies


def fused_supports(cfg: ModelConfig) -> bool:
    """True when the graph implements `cfg`: every field outside IMPLEMENTED at its default (a field added to
    ModelConfig later counts as unsupported until this graph implements it), and a head size GroupQueryAttention's
    CPU kernel takes (a multiple of 16)."""
    if cfg.head_dim % 16:
        return False
    for f in dataclasses.fields(ModelConfig):
        if f.name in IMPLEMENTED:
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


@dataclasses.dataclass(frozen=True)
class Precision:
    """How the weights are stored: bits None = fp32 MatMul; else MatMulNBits in blocks of `block` for the layer and
    head weights, `transform_bits` for the d x d PIT transforms, `embedding_bits` for an untied layout's table (None:
    fp32 Gather); `level` is MatMulNBits' accuracy_level (None: not set)."""

    bits: int | None = None
    transform_bits: int | None = None
    embedding_bits: int | None = None
    block: int = 32
    symmetric: bool = True
    level: int | None = None

    def quantizer(self, bits: int):
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )

        cfg = DefaultWeightOnlyQuantConfig(
            block_size=self.block, is_symmetric=self.symmetric, accuracy_level=self.level, bits=bits
        )
        return DefaultWeightOnlyQuantizer(cfg)


class _Graph:
    """Nodes and initializers; an initializer of INLINE_BELOW bytes or more goes straight to `data` (the model's
    external data file, named `location`), so the proto never holds the weights."""

    def __init__(self, data: BinaryIO, location: str, precision: Precision):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.data, self.location, self.precision = data, location, precision
        self._quantizers: dict[int, object] = {}

    def _tensor(self, name: str, dtype: int, dims, pieces) -> str:
        """An initializer whose bytes are the arrays `pieces` yields, in turn (C order): written to the data file, or
        kept in the proto when under INLINE_BELOW bytes."""
        t = TensorProto(name=name, data_type=dtype, dims=list(dims))
        offset = self.data.tell()
        for a in pieces:
            self.data.write(memoryview(np.ascontiguousarray(a)).cast("B"))
        length = self.data.tell() - offset
        if length < INLINE_BELOW:
            self.data.seek(offset)
            t.raw_data = self.data.read(length)
            self.data.seek(offset)
            self.data.truncate()
        else:
            for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
                t.external_data.add(key=k, value=v)
            t.data_location = TensorProto.EXTERNAL
        self.inits.append(t)
        return name

    def init(self, name: str, array: np.ndarray) -> str:
        array = np.asarray(array)
        return self._tensor(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape, [array])

    def init_t(self, name: str, w: torch.Tensor) -> str:
        """w [N, K] (a torch Linear's weight) stored transposed, [K, N], CHUNK rows of it at a time."""
        n, k = w.shape
        rows = (w[:, i : i + CHUNK].T.float().numpy() for i in range(0, k, CHUNK))
        return self._tensor(name, TensorProto.FLOAT, (k, n), rows)

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> list[str]:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def _quantizer(self, bits: int):
        if bits not in self._quantizers:
            self._quantizers[bits] = self.precision.quantizer(bits)
        return self._quantizers[bits]

    def matmul(self, x: str, wname: str, w: torch.Tensor, out: str, name: str, bits: int | None) -> str:
        """x @ w.T: a MatMul on the fp32 weight, or (bits set) the MatMulNBits onnxruntime's quantizer makes of that
        MatMul (its names, attributes and codes)."""
        if bits is None:
            return self.node("MatMul", [x, self.init_t(wname, w)], [out], name)[0]
        return self.matmul_nbits(x, self.nbits(wname, w, bits), out, name, bits, *w.shape)

    def nbits(self, wname: str, w: torch.Tensor, bits: int) -> list[str]:
        """w [N, K] as the quantizer stores a MatMul weight, quantized CHUNK output columns at a time: the names of
        its codes, scales (and zero points)."""
        q = self._quantizer(bits)
        parts = [q.qbits_block_quant(w[i : i + CHUNK].T.float().numpy().copy()) for i in range(0, len(w), CHUNK)]
        packed, scales, zps = (np.concatenate(p) for p in zip(*parts, strict=True))
        names = [self.init(f"{wname}_Q{bits}", packed), self.init(f"{wname}_scales", scales)]
        if not self.precision.symmetric:
            names.append(self.init(f"{wname}_zero_points", zps))
        return names

    def matmul_nbits(self, x: str, weight: list[str], out: str, name: str, bits: int, n: int, k: int) -> str:
        level = {"accuracy_level": self.precision.level} if self.precision.level else {}
        attrs = dict(K=k, N=n, bits=bits, block_size=self.precision.block, **level)
        return self.node("MatMulNBits", [x, *weight], [out], f"{name}_Q{bits}", MS, **attrs)[0]

    def gather_q4(self, tname: str, table: torch.Tensor, ids: str, out: str, name: str) -> str:
        """The untied table as onnxruntime's quantizer makes a Gather of it: GatherBlockQuantized, 4-bit blocks along
        d (quantize_axis 1), CHUNK rows at a time."""
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

        p = self.precision
        parts = [
            DefaultWeightOnlyQuantizer.quantize_ndarray(table[i : i + CHUNK].float().numpy(), 1, p.block, p.symmetric)
            for i in range(0, table.shape[0], CHUNK)
        ]
        qtype = TensorProto.INT4 if p.symmetric else TensorProto.UINT4
        shape = tuple(table.shape)
        inputs = [self._tensor(f"{tname}_Q4", qtype, shape, (q for q, _, _ in parts)), ids]
        inputs.append(self.init(f"{tname}_scales", np.concatenate([s for _, s, _ in parts])))
        if not p.symmetric:
            zshape = (shape[0], -(-shape[1] // p.block))
            inputs.append(self._tensor(f"{tname}_zero_points", qtype, zshape, (z for _, _, z in parts)))
        attrs = dict(gather_axis=0, quantize_axis=1, block_size=p.block)
        return self.node("GatherBlockQuantized", inputs, [out], f"{name}_Q4", MS, **attrs)[0]

    def bias(self, x: str, name: str, b: torch.Tensor | None) -> str:
        if b is None:
            return x
        bias = self.init(name.replace("/", ".") + ".bias", b.float().numpy())
        return self.node("Add", [x, bias], [f"{name}/biased"], f"{name}/Add")[0]


def _w(fw: FoldedWeights, name: str) -> torch.Tensor:
    return fw.tensors[name].detach()


def _cat(fw: FoldedWeights, names: list[str]) -> torch.Tensor | None:
    """The named tensors concatenated along dim 0 (a packed weight or bias); None when the first is absent."""
    if names[0] not in fw.tensors:
        return None
    return torch.cat([_w(fw, n) for n in names])


def write(fw: FoldedWeights, names: dict[str, str], model: Path, data_name: str, precision: Precision) -> None:
    """The fused decoder at `precision` into `model` and its weights into `model.parent / data_name`. `names` gives
    the interface tensors' names (onnx.py's EMB_OUT, HEAD_IN, LOGITS, HEAD_W)."""
    with open(model.parent / data_name, "w+b") as data:
        g = _Graph(data, data_name, precision)
        proto = _build(g, fw, names)
    onnx.save_model(proto, model)


def _build(g: _Graph, fw: FoldedWeights, names: dict[str, str]) -> onnx.ModelProto:
    cfg, layout, prec = fw.cfg, fw.layout, g.precision
    d, hd, V, L = cfg.dim, cfg.head_dim, cfg.vocab_size, cfg.n_layers
    emb_out, head_in, logits, head_w = names["EMB_OUT"], names["HEAD_IN"], names["LOGITS"], names["HEAD_W"]
    bits, tbits = prec.bits, prec.transform_bits

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

    # embedding: in the compact layouts the gather reads the head's d x V weight (its transpose in fp32; quantized,
    # the head's MatMulNBits blocks viewed as [V, d bits / 8], onnxruntime-genai's layout for tied models)
    gathered = "table_rows" if layout == "shared-z" else emb_out
    if layout == "untied":
        table = _w(fw, "tok_embeddings.weight")
        if prec.embedding_bits:
            g.gather_q4("tok_embeddings.weight", table, "input_ids", gathered, "embed/Gather")
        else:
            rows = g.init("tok_embeddings.weight", table.float().numpy())
            g.node("Gather", [rows, "input_ids"], [gathered], "embed/Gather", axis=0)
    elif bits is None:
        head = g.init_t(head_w, _w(fw, "table.weight"))
        (table,) = g.node("Transpose", [head], ["table"], "embed/Transpose", perm=[1, 0])
        g.node("Gather", [table, "input_ids"], [gathered], "embed/Gather", axis=0)
    else:  # the head's blocks, written now: the gather reads them here and the head below
        head_q = g.nbits(head_w, _w(fw, "table.weight"), bits)
        shape, nodes = table_gather(head_q, V, d, bits, prec.block, gathered)
        g.init("table_q_shape", shape)
        g.nodes += nodes
    if layout == "shared-z":
        g.matmul(gathered, "embed_proj.weight", _w(fw, "embed_proj.weight"), emb_out, "embed/embed_proj/MatMul", tbits)

    past, present = kv_names(L)
    residual, delta = emb_out, None
    attrs = dict(
        num_heads=cfg.n_heads,
        kv_num_heads=cfg.n_kv_heads,
        scale=cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(hd),
        local_window_size=-1,
        softcap=0.0,
        do_rotary=1,
        rotary_interleaved=0,
    )
    for i in range(L):
        p, a, f = f"layers.{i}", f"layers.{i}.attention", f"layers.{i}.feed_forward"
        residual, x = _norm(g, f"{p}/attention_norm", residual, delta, _w(fw, f"{p}.attention_norm"), cfg.norm_eps)
        qkv_w = _cat(fw, [f"{a}.{w}.weight" for w in ("wq", "wk", "wv")])
        qkv = g.matmul(x, f"{a}.qkv.weight", qkv_w, f"{p}/qkv", f"{p}/qkv/MatMul", bits)
        qkv = g.bias(qkv, f"{p}/qkv", _cat(fw, [f"{a}.{w}.bias" for w in ("wq", "wk", "wv")]))
        gqa_in = [qkv, "", "", past[2 * i], past[2 * i + 1], seqlens_k, total, cos_cache, sin_cache]
        outs = [f"{p}/attention", present[2 * i], present[2 * i + 1]]
        (att, *_) = g.node("GroupQueryAttention", gqa_in, outs, f"{p}/GroupQueryAttention", MS, **attrs)
        delta = g.matmul(att, f"{a}.wo.weight", _w(fw, f"{a}.wo.weight"), f"{p}/attention_out", f"{p}/wo/MatMul", bits)
        delta = g.bias(delta, f"{p}/wo", fw.tensors.get(f"{a}.wo.bias"))
        residual, x = _norm(g, f"{p}/ffn_norm", residual, delta, _w(fw, f"{p}.ffn_norm"), cfg.norm_eps)
        w13 = _cat(fw, [f"{f}.w1.weight", f"{f}.w3.weight"])
        h13 = g.matmul(x, f"{f}.w13.weight", w13, f"{p}/w13", f"{p}/w13/MatMul", bits)
        h13 = g.bias(h13, f"{p}/w13", _cat(fw, [f"{f}.w1.bias", f"{f}.w3.bias"]))
        gate, up = g.node("Split", [h13], [f"{p}/gate", f"{p}/up"], f"{p}/Split", axis=-1, num_outputs=2)
        (act,) = g.node("QuickGelu", [gate], [f"{p}/silu"], f"{p}/SiLU", MS, alpha=1.0)  # x sigmoid(x)
        (h,) = g.node("Mul", [act, up], [f"{p}/gated"], f"{p}/Mul")
        delta = g.matmul(h, f"{f}.w2.weight", _w(fw, f"{f}.w2.weight"), f"{p}/ffn_out", f"{p}/w2/MatMul", bits)
        delta = g.bias(delta, f"{p}/w2", fw.tensors.get(f"{f}.w2.bias"))

    # final RMSNorm (gain folded into the head: a ones weight), the rows kept for the head, and the head
    g.node(
        "SkipSimplifiedLayerNormalization",
        [residual, delta, g.init("norm.ones", np.ones(d, np.float32))],
        [ROWS],
        "final_norm/SkipSimplifiedLayerNormalization",
        MS,
        epsilon=cfg.norm_eps,
    )
    consts, nodes = keep_rows(ROWS, head_in)
    for name, value in consts.items():
        g.init(name, value)
    g.nodes += nodes
    h = head_in
    if layout != "untied":
        h = g.matmul(h, "head_proj.weight", _w(fw, "head_proj.weight"), "head_proj", "head/head_proj/MatMul", tbits)
    if layout == "untied":
        g.matmul(h, head_w, _w(fw, "output.weight"), logits, "head/MatMul", bits)
    elif bits is None:
        g.node("MatMul", [h, head_w], [logits], "head/MatMul")
    else:
        g.matmul_nbits(h, head_q, logits, "head/MatMul", bits, V, d)

    fp = TensorProto.FLOAT
    kv = ["batch", cfg.n_kv_heads, "max_sequence_length", hd]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence_length"]),
        *(helper.make_tensor_value_info(n, fp, kv) for n in past),
        helper.make_tensor_value_info(KEEP, TensorProto.INT64, [1]),
    ]
    outputs = [
        helper.make_tensor_value_info(logits, fp, ["batch", 1, V]),
        *(helper.make_tensor_value_info(n, fp, kv) for n in present),
    ]
    graph = helper.make_graph(g.nodes, "pit_decoder", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9, producer_name="pit-export")


def keep_rows(src: str, out: str) -> tuple[dict[str, np.ndarray], list[onnx.NodeProto]]:
    """out = src[:, logits_from:] (one Slice on axis 1): the rows the head computes logits for. logits_from is an
    initializer listed among the graph inputs, so a caller may feed it: by default -1, the last position only, as
    onnxruntime-genai's pruned-head models (its builder's prune_lm_head; genai reads logits dim 1 == 1 and takes them
    as the last token's); 0 keeps every row, which validation feeds; -k the last k. Returns the constants (name ->
    value) and the node."""
    consts = {
        KEEP: np.array([-1], np.int64),
        "keep_rows_end": np.array([np.iinfo(np.int64).max], np.int64),
        "keep_rows_axis": np.array([1], np.int64),
    }
    node = helper.make_node("Slice", [src, KEEP, "keep_rows_end", "keep_rows_axis"], [out], "head/keep_rows/Slice")
    return consts, [node]


def table_gather(weight: list[str], V: int, d: int, bits: int, block: int, out: str):
    """The one table's gather in a quantized compact layout: GatherBlockQuantized over the head's MatMulNBits weight
    [V, d / block, block bits / 8] viewed as [V, d bits / 8] (onnxruntime-genai's layout for tied models). `weight`:
    the head's codes, scales (and zero points). Returns the value of the initializer "table_q_shape" and the Reshape
    and GatherBlockQuantized nodes."""
    shape = np.array([V, d * bits // 8], dtype=np.int64)
    gather = ["table_q", "input_ids", *weight[1:3]]
    attrs = dict(bits=bits, block_size=block, gather_axis=0, quantize_axis=1)
    return shape, [
        helper.make_node("Reshape", [weight[0], "table_q_shape"], ["table_q"]),
        helper.make_node("GatherBlockQuantized", gather, [out], domain=MS, **attrs),
    ]


def _norm(g: _Graph, name: str, residual: str, delta: str | None, weight: torch.Tensor, eps: float) -> tuple[str, str]:
    """RMSNorm of residual (+ delta): (the new residual, the normed input). The first layer has no delta."""
    w = g.init(f"{name.replace('/', '.')}.weight", weight.float().numpy())
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

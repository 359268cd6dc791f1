"""ONNX Runtime backend: an onnxruntime-genai folder with a past/present KV interface, plus embed/unembed probes.

Two graphs: the configs onnx_fused.py implements (onnx_fused.fused_supports: Llama incl. scaled RoPE, Qwen2.5)
get its fused graph (GroupQueryAttention with the KV cache in one shared past/present buffer,
SkipSimplifiedLayerNormalization, packed projections), written op by op and quantized as it is written; every other
config gets the traced graph below (KVDecoder through torch.onnx.export), quantized afterwards (quantize). Both take
the same quantizer and recipe (precision), probes, config files and mobile format; the folder's genai_config.json
says which KV interface it has (past_present_share_buffer). What follows describes the traced graph's interface.

Files written:
    model.onnx, model.onnx.data   the decoder: input_ids, attention_mask, position_ids, past_key_values.{i}.key/value
                                  [, logits_from] -> logits, present.{i}.key/value (present = concat(past, new);
                                  past may be empty); logits of the last position unless logits_from says more
                                  (onnx_fused.keep_rows: 0 = every position)
    embed.onnx, unembed.onnx      round-trip probes cut out of model.onnx; their weights point into model.onnx.data,
                                  so they read exactly the deployed (quantized) bytes and add no size
    model.ort                     ORT mobile format of model.onnx (weights inside), for onnxruntime-mobile on phones
    genai_config.json, tokenizer_config.json

Quantization (by scheme): every weight MatMul (body, head, d x d transforms) becomes MatMulNBits with block 32, the d x
d transforms at 8 bits at least (TRANSFORM_BITS): int4 = 4-bit weights, float compute; int8 / 8da4w = 8- / 4-bit
weights with accuracy_level 4 (activations quantized to int8 per block at run time); embedding_bits=4 in the untied
layout = GatherBlockQuantized. int8 uses MatMulNBits rather than quantize_dynamic: its per-tensor activation scales
cost ppl x1.008 on pit-tiny (gate 1.005) where per-block int8 costs x1.0004. The compact layouts (shared-z, shared-e)
keep ONE V x d table: in fp32 the gather reads Transpose(head weight); quantized, a GatherBlockQuantized reads the
head's MatMulNBits weight (onnxruntime-genai's tied-model layout), so the embedding takes the head's precision. The d x
d transforms stay ordinary (8-bit) MatMuls around that table: PIT is never silently tied.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from pit_export.compat.onnxscript import forget_matched_graphs
from pit_export.decoder import CachedAttention, Decoder, FoldedWeights
from pit_export.errors import BadInput
from pit_export.export import onnx_fused
from pit_export.export.onnx_fused import Precision, fused_supports, kv_names
from pit_export.memory import FORK_ABOVE_BYTES, release_memory, run_forked
from pit_export.models.checkpoint import scratch_dir
from pit_export.models.pit import allowed
from pit_export.quantize import ONNX_SYMMETRIC, Scheme

OPSET = 18
MODEL, DATA, ORT_MODEL = "model.onnx", "model.onnx.data", "model.ort"
EMBED, UNEMBED = "embed.onnx", "unembed.onnx"
# stable tensor names at the interface boundaries, set on the fp32 graph; quantizers keep activation names
EMB_OUT, HEAD_IN, LOGITS = "embeddings", "final_hidden", "logits"
HEAD_OUT = "head_logits"  # the head's output where logit soft-capping follows it
BLOCK = 32
TRANSFORM_BITS = 8  # the d x d transforms under every quantized scheme (transform_nodes)
MASK_MIN = torch.finfo(torch.float32).min  # finite: a fully padded row must not turn into NaN


class ConcatAttention(CachedAttention):
    """onnxruntime-genai's cache handling: a layer's past k/v come in, present = concat(past, new) goes out (appended
    to the list the cache argument carries). Everything else is CachedAttention's."""

    def write_cache(self, cache, k, v):
        past_k, past_v, presents = cache
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        presents += [k, v]
        return k, v


class KVDecoder(nn.Module):
    """A Decoder built on ConcatAttention behind onnxruntime-genai's interface: input_ids, attention_mask,
    position_ids and past k/v in; logits and present k/v out. Only the masks and the cache handling are its own."""

    def __init__(self, dec: Decoder):
        super().__init__()
        self.dec = dec

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor]):
        dec = self.dec
        s, total = input_ids.shape[1], attention_mask.shape[1]
        # query i sits at total - s + i: causal over past + new (within the window on sliding layers), and padded
        # keys are never attended
        q_pos = torch.arange(s, device=input_ids.device) + (total - s)
        k_pos = torch.arange(total, device=input_ids.device)
        pad = attention_mask[:, None, None, :] > 0
        windows = {"full": None, **({"sliding": dec.cfg.sliding_window} if dec.cfg.has_sliding else {})}
        masks = {k: torch.where(allowed(q_pos, k_pos, w)[None, None] & pad, 0.0, MASK_MIN) for k, w in windows.items()}
        presents: list[torch.Tensor] = []
        caches = [(past[2 * i], past[2 * i + 1], presents) for i in range(len(dec.layers))]
        logits = dec.run(input_ids, position_ids[:, None], masks, caches)  # RoPE tables at [b, 1, s, hd / 2]
        return logits, *presents


# ---------------------------------------------------------------- fp32 graph


def export_fp32(dec: Decoder, dest: Path) -> onnx.ModelProto:
    """Trace the KV decoder and write it to `dest` (+ `dest.data`) straight from the module's own tensors, one
    tensor at a time: no serialized in-memory copy of the weights. Returns the graph, its weights left on disk."""
    cfg = dec.cfg
    b, s, p = 2, 3, 4  # example sizes > 1 so no dim is specialised; past = 0 works at run time
    past = [torch.zeros(b, cfg.n_kv_heads, p, cfg.head_dim) for _ in range(2 * cfg.n_layers)]
    ids = torch.zeros(b, s, dtype=torch.long)
    args = (ids, torch.ones(b, p + s, dtype=torch.long), torch.arange(p, p + s).repeat(b, 1), past)
    past_names, present_names = kv_names(cfg.n_layers)
    batch, seq, plen = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past", min=0)
    total = torch.export.Dim.AUTO
    dyn = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, [{0: batch, 2: plen}] * len(past))
    with torch.no_grad():
        prog = torch.onnx.export(
            KVDecoder(dec).eval(),
            args,
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=[LOGITS, *present_names],
            dynamic_shapes=dyn,
            opset_version=OPSET,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    prog.save(dest, external_data=True)
    del prog
    forget_matched_graphs()  # the optimizer's rewrite rules would keep the traced graph, weights included
    return onnx.load(dest, load_external_data=False)


# ---------------------------------------------------------------- graph edits on the fp32 graph

HEAD_W = "lm_head.weight"  # the head's d x V MatMul weight; in compact layouts also the one table
FUSED_NAMES = {"EMB_OUT": EMB_OUT, "HEAD_IN": HEAD_IN, "LOGITS": LOGITS, "HEAD_W": HEAD_W}  # onnx_fused.py


def _producer(g: onnx.GraphProto, name: str):
    return next((n for n in g.node if name in n.output), None)


def _consumers(g: onnx.GraphProto, name: str) -> list:
    return [n for n in g.node if name in n.input]


def _init(g: onnx.GraphProto, name: str):
    return next((t for t in g.initializer if t.name == name), None)


def _rename(g: onnx.GraphProto, old: str, new: str) -> None:
    for n in g.node:
        n.input[:] = [new if x == old else x for x in n.input]
        n.output[:] = [new if x == old else x for x in n.output]


def canonicalize(model: onnx.ModelProto, layout: str, base_dir: Path) -> None:
    """Name the interface tensors and make the head a MatMul on one d x V initializer that quantizers can see.

    dynamo exports the head as MatMul(x, Transpose(W)); W becomes the initializer lm_head.weight = W^T, and in the
    compact layouts the embedding Gather reads Transpose(lm_head.weight): one table on disk. Weights may be external
    (relative to `base_dir`)."""
    g = model.graph
    head = _head(g)
    if head.output[0] != LOGITS:  # logit soft-capping follows the head: the unembed probe stops before it
        _rename(g, head.output[0], HEAD_OUT)
    tr = _producer(g, head.input[1])
    assert head.op_type == "MatMul" and (tr is None or tr.op_type == "Transpose"), "unexpected head in the graph"
    if tr is None:  # an unshared weight: dynamo already folded the transpose into a d x V initializer
        _init(g, head.input[1]).name = HEAD_W
        _rename(g, head.input[1], HEAD_W)
    else:
        w = _init(g, tr.input[0])
        g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(w, str(base_dir)).T.copy(), HEAD_W))
        head.input[1] = HEAD_W
        g.node.remove(tr)
    gather = next(n for n in g.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    if layout != "untied":  # the head's table is the gather's table
        assert tr is not None and gather.input[0] == w.name, "compact layout without a shared table"
        g.node.append(helper.make_node("Transpose", [HEAD_W], ["table"], perm=[1, 0]))
        gather.input[0] = "table"
        g.initializer.remove(w)
    # interface names: embed output (after embed_proj in shared-z) and the head input (before head_proj)
    emb = gather.output[0]
    if layout == "shared-z":
        emb = _consumers(g, emb)[0].output[0]
    _rename(g, emb, EMB_OUT)
    h = head.input[0]
    if layout != "untied":
        h = _producer(g, h).input[0]
    _rename(g, h, HEAD_IN)
    # the head reads the rows from logits_from on of the final norm's output (onnx_fused.keep_rows)
    norm = _producer(g, HEAD_IN)
    norm.output[list(norm.output).index(HEAD_IN)] = onnx_fused.ROWS
    consts, nodes = onnx_fused.keep_rows(onnx_fused.ROWS, HEAD_IN)
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    g.node.extend(nodes)
    g.input.append(helper.make_tensor_value_info(onnx_fused.KEEP, TensorProto.INT64, [1]))
    logits = next(o for o in g.output if o.name == LOGITS).type.tensor_type.shape.dim[1]
    logits.Clear()
    logits.dim_value = 1
    _toposort(g)


def _toposort(g: onnx.GraphProto) -> None:
    known = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    nodes, out = list(g.node), []
    while nodes:
        ready = [n for n in nodes if all(x in known for x in n.input)]
        assert ready, "graph has a cycle or a dangling input"
        for n in ready:
            out.append(n)
            known.update(n.output)
            nodes.remove(n)
    del g.node[:]
    g.node.extend(out)


# ---------------------------------------------------------------- quantization


def precision(scheme: Scheme, layout: str) -> Precision:
    """What `scheme` means for an ONNX graph in `layout`: every weight MatMul -> MatMulNBits (block 32), the d x d
    transforms at TRANSFORM_BITS or more, an untied table at `embedding_bits` (GatherBlockQuantized)."""
    if scheme.linear_bits is None:
        if scheme.embedding_bits:
            raise BadInput("onnx: a quantized embedding needs a quantized scheme (int8, int4, 8da4w)")
        return Precision()
    if scheme.embedding_bits is not None and (scheme.embedding_bits != 4 or scheme.linear_bits != 4):
        raise BadInput("onnx: the separate quantized embedding is 4-bit only (int4+emb4, 8da4w+emb4)")
    return Precision(
        bits=scheme.linear_bits,
        transform_bits=None if layout == "untied" else max(scheme.linear_bits, TRANSFORM_BITS),
        embedding_bits=scheme.embedding_bits if layout == "untied" else None,
        block=BLOCK,
        symmetric=ONNX_SYMMETRIC,
        # accuracy_level 4 = int8 compute on activations quantized per block at run time ("dynamic int8 activations")
        level=4 if scheme.activations == "int8-dynamic" else None,
    )


def quantize(model: onnx.ModelProto, prec: Precision, layout: str, base_dir: Path) -> onnx.ModelProto:
    """The traced graph at `prec`: onnxruntime's MatMulNBits quantizer over the whole graph (4-bit pass, then the d x d
    transforms); in compact layouts the gather then reads the head's table. The fused graph is quantized as it is
    written (onnx_fused.py), with the same quantizer, weight by weight."""
    if prec.bits is None:
        return model
    onnx.load_external_data_for_model(model, str(base_dir))  # the quantizer reads and replaces them in memory
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    ops = ("MatMul", "Gather") if prec.embedding_bits else ("MatMul",)
    transforms = transform_nodes(model.graph, layout)

    def run(bits: int, ops: tuple[str, ...], exclude: list[str]) -> onnx.ModelProto:
        q = MatMulNBitsQuantizer(
            model,
            bits,
            prec.block,
            is_symmetric=prec.symmetric,
            accuracy_level=prec.level,
            op_types_to_quantize=ops,
            nodes_to_exclude=exclude,
        )
        q.process()
        return q.model.model

    model = run(prec.bits, ops, transforms)
    if transforms:  # the only float MatMuls with a weight left
        model = run(prec.transform_bits, ("MatMul",), [])
    if layout != "untied":
        _share_table(model.graph)
    _toposort(model.graph)
    return model


def transform_nodes(g: onnx.GraphProto, layout: str) -> list[str]:
    """The d x d PIT transforms' MatMuls of a compact layout: embed_proj (producing EMB_OUT, shared-z) and head_proj
    (reading HEAD_IN). They carry cond(T): 4-bit rounding of either costs KL x1.9 on pit-tiny where 8 bits cost
    nothing measurable (benchmarks/results/quant-variants.md), for d x d bytes (d/V of the table per transform)."""
    if layout == "untied":
        return []
    nodes = [_producer(g, EMB_OUT)] if layout == "shared-z" else []
    nodes += [n for n in _consumers(g, HEAD_IN) if n.op_type == "MatMul"]
    assert all(n is not None and n.op_type == "MatMul" for n in nodes), "unexpected d x d transforms in the graph"
    return [n.name for n in nodes]


def _head(g: onnx.GraphProto):
    """The head's MatMul: the producer of the logits, before the soft-capping ops (Div, Tanh, Mul) if any."""
    node = _producer(g, LOGITS)
    while node.op_type in ("Div", "Tanh", "Mul"):
        node = next(p for x in node.input if (p := _producer(g, x)) is not None and p.op_type != "Constant")
    return node


def _share_table(g: onnx.GraphProto) -> None:
    """The gather reads the head's MatMulNBits weight (onnx_fused.table_gather): the one table, in the head's
    precision; the fp32 table and its Transpose go."""
    head = _head(g)
    assert head.op_type == "MatMulNBits", head.op_type
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    gather = next(n for n in g.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    shape, nodes = onnx_fused.table_gather(
        list(head.input[1:4]), attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"], gather.output[0]
    )
    g.initializer.append(numpy_helper.from_array(shape, "table_q_shape"))
    g.node.remove(_producer(g, gather.input[0]))  # Transpose(lm_head.weight): the fp32 table goes with it
    g.node.remove(gather)
    g.node.extend(nodes)
    g.initializer.remove(_init(g, HEAD_W))


# ---------------------------------------------------------------- probes, config files, mobile format


def _subgraph(model: onnx.ModelProto, inputs: list, outputs: list[str], name: str, pre: list) -> onnx.ModelProto:
    """The nodes of `model` computing `outputs` from `inputs` (value infos), with the initializers they read
    (external references into model.onnx.data stay references). `pre` are extra leading nodes/initializers."""
    g = model.graph
    stop = {i.name for i in inputs} | {i for n in pre if isinstance(n, onnx.NodeProto) for i in n.output}
    need, nodes = set(outputs), []
    for n in reversed(g.node):
        if any(o in need for o in n.output):
            nodes.append(n)
            need.update(x for x in n.input if x and x not in stop)
    inits = [t for t in g.initializer if t.name in need] + [t for t in pre if isinstance(t, TensorProto)]
    outs = [v for v in list(g.output) + list(g.value_info) if v.name in outputs]
    outs += [
        helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs if o not in {v.name for v in outs}
    ]
    body = [n for n in pre if isinstance(n, onnx.NodeProto)] + nodes[::-1]
    graph = helper.make_graph(body, name, inputs, outs, inits)
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def write_probes(out: Path, d: int, inv_gain: np.ndarray) -> None:
    """embed.onnx: input_ids [b, s] -> embeddings; unembed.onnx: hidden [b, s, d] -> logits of h / g (no gain)."""
    model = onnx.load(out / MODEL, load_external_data=False)
    ids = next(i for i in model.graph.input if i.name == "input_ids")
    onnx.save(_subgraph(model, [ids], [EMB_OUT], "embed", []), out / EMBED)
    hidden = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", d])
    gain = numpy_helper.from_array(inv_gain.astype(np.float32), "inv_gain")
    pre = [gain, helper.make_node("Mul", ["hidden", "inv_gain"], [HEAD_IN])]
    head_out = HEAD_OUT if any(HEAD_OUT in n.output for n in model.graph.node) else LOGITS
    onnx.save(_subgraph(model, [hidden], [head_out], "unembed", pre), out / UNEMBED)


def genai_config(fw: FoldedWeights, ckpt, fused: bool = False) -> dict:
    """genai_config.json. The traced graph takes position_ids and returns present = concat(past, new), a new buffer
    each step; the fused graph (onnx_fused) derives positions from the mask and writes one shared past/present buffer
    of max_length in place (past_present_share_buffer)."""
    cfg = fw.cfg
    past, present = kv_names(cfg.n_layers)
    pad = ckpt.tokenizer.token_to_id("<|pad|>") if ckpt is not None else None
    return {
        "model": {
            "type": "llama",  # onnxruntime-genai's plain decoder-only pipeline; our graph computes everything itself
            "vocab_size": cfg.vocab_size,
            "context_length": cfg.max_seq_len,
            "bos_token_id": cfg.bos_id,
            "eos_token_id": cfg.eos_id,
            "pad_token_id": cfg.eos_id if pad is None else pad,
            "decoder": {
                "filename": MODEL,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": cfg.head_dim,
                "hidden_size": cfg.dim,
                "num_attention_heads": cfg.n_heads,
                "num_hidden_layers": cfg.n_layers,
                "num_key_value_heads": cfg.n_kv_heads,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    **({} if fused else {"position_ids": "position_ids"}),
                    "past_key_names": past[0].replace(".0.", ".%d."),
                    "past_value_names": past[1].replace(".0.", ".%d."),
                },
                "outputs": {
                    "logits": LOGITS,
                    "present_key_names": present[0].replace(".0.", ".%d."),
                    "present_value_names": present[1].replace(".0.", ".%d."),
                },
            },
        },
        "search": {"max_length": cfg.max_seq_len, "past_present_share_buffer": fused, "do_sample": False},
    }


def tokenizer_config(ckpt, cfg) -> dict:
    """What onnxruntime-genai's tokenizer (onnxruntime-extensions) reads next to tokenizer.json."""
    name = ckpt.tokenizer.id_to_token
    pad = ckpt.tokenizer.token_to_id("<|pad|>")
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.max_seq_len,
        "add_bos_token": False,
        "bos_token": name(cfg.bos_id),
        "eos_token": name(cfg.eos_id),
        "pad_token": name(cfg.eos_id if pad is None else pad),
    }


def to_ort_format(src: Path, dst: Path) -> None:
    """ORT mobile format (what convert_onnx_models_to_ort does, 'Fixed' style): basic optimizations only, so the
    file stays free of x86-specific layouts and runs on ARM builds of onnxruntime(-mobile). Constant folding is off:
    it would store Reshape(table) as a second copy of the shared table."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3  # not the note that logits_from, an overridable input, is not a constant
    so.optimized_model_filepath = str(dst)
    so.add_session_config_entry("session.save_model_format", "ORT")
    so.add_session_config_entry("session.disable_prepacking", "1")  # packed weights are not saved: a copy for nothing
    so.enable_cpu_mem_arena = False
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"], disabled_optimizers=["ConstantFolding"])


# ---------------------------------------------------------------- backend entry point


_GRAPHS: dict[str, bytes] = {}  # folded-weights digest -> canonical fp32 graph: one trace serves every scheme
# Only small models are cached (tests, benchmarks exporting every scheme): a large model's serialized copy would add a
# whole model to the export's peak memory.
CACHE_MAX_BYTES = 256 * 2**20


def fp32_graph(fw: FoldedWeights, scratch: Path) -> onnx.ModelProto:
    """The canonical fp32 graph; a large model's weights stay external, in `scratch`."""
    cacheable = fw.nbytes <= CACHE_MAX_BYTES
    if cacheable:
        h = hashlib.sha256(f"{fw.layout}{fw.cfg.to_json()}".encode())
        for k in sorted(fw.tensors):
            h.update(k.encode() + fw.tensors[k].numpy().tobytes())
        key = h.hexdigest()
        if key in _GRAPHS:
            return onnx.load_from_string(_GRAPHS[key])  # a copy: quantization edits it
    model = export_fp32(Decoder(fw, ConcatAttention), scratch / "traced.onnx")
    canonicalize(model, fw.layout, scratch)
    if cacheable:
        onnx.load_external_data_for_model(model, str(scratch))
        if len(_GRAPHS) >= 4:
            _GRAPHS.pop(next(iter(_GRAPHS)))
        _GRAPHS[key] = model.SerializeToString()
    return model


def save_external(model: onnx.ModelProto, dest: Path, base_dir: Path) -> None:
    """onnx.save_model(..., save_as_external_data=True) for a graph whose weights may still be in another external
    file: every tensor of 1 KiB or more goes to `DATA`, one at a time. Tensors already external are copied file to
    file, never through the proto: protobuf keeps a cleared field's bytes in its arena until the whole message goes,
    so loading them into raw_data would hold every weight until the end."""
    from onnx.external_data_helper import ExternalDataInfo

    with open(dest.parent / DATA, "wb") as f:
        for t in model.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                info = ExternalDataInfo(t)
                with open(base_dir / info.location, "rb") as src:
                    src.seek(info.offset or 0)
                    data = src.read() if info.length is None else src.read(info.length)
            elif len(t.raw_data) >= 1024:
                data = t.raw_data
                t.ClearField("raw_data")
            else:
                continue
            del t.external_data[:]
            for k, v in (("location", DATA), ("offset", str(f.tell())), ("length", str(len(data)))):
                t.external_data.add(key=k, value=v)
            t.data_location = TensorProto.EXTERNAL
            f.write(data)
            del data
    onnx.save_model(model, dest)


def write_model(fw: FoldedWeights, scheme: Scheme, out: Path, progress, times: dict) -> None:
    """Trace, quantize and save model.onnx + model.onnx.data into `out`; frees the folded weights."""
    prec = precision(scheme, fw.layout)
    with scratch_dir() as scratch:
        t0 = time.perf_counter()
        progress("onnx: torch.onnx.export (dynamo)")
        model = fp32_graph(fw, scratch)
        fw.release()  # traced to disk: from here on the weights live in scratch (or, for a small model, in `model`)
        release_memory()
        times["export_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        progress(f"onnx: quantize ({scheme.name})")
        model = quantize(model, prec, fw.layout, scratch)
        times["quantize_s"] = time.perf_counter() - t0
        save_external(model, out / MODEL, scratch)


def export(fw: FoldedWeights, scheme: Scheme, out: Path, ckpt, progress=lambda msg: None) -> dict:
    out = Path(out)
    times: dict[str, float] = {}
    cfg, inv_gain = fw.cfg, fw.tensors["inv_gain"].numpy().copy()
    # ---- graph selection: the configs onnx_fused implements get the fused graph, written (and quantized) weight by
    # weight from the folded weights; the others are traced
    fused = fused_supports(cfg)
    if fused:
        progress(f"onnx: fused graph (GroupQueryAttention, SkipSimplifiedLayerNormalization), {scheme.name}")
        t0 = time.perf_counter()
        onnx_fused.write(fw, FUSED_NAMES, out / MODEL, DATA, precision(scheme, fw.layout))
        times["export_s"] = time.perf_counter() - t0
        fw.release()
        release_memory()
    elif fw.nbytes <= FORK_ABOVE_BYTES:
        write_model(fw, scheme, out, progress, times)
    else:
        # a large model: the trace leaves ~250 MB of unreachable-but-uncollectable heap at 135M parameters, which the
        # ORT conversion below (two copies of the weights) would stack on; a forked child takes it with it
        progress(f"onnx: torch.onnx.export (dynamo) + quantize ({scheme.name}), in a child process")
        t0 = time.perf_counter()
        run_forked(lambda: write_model(fw, scheme, out, lambda msg: None, {}))
        times["export_s"] = time.perf_counter() - t0
        fw.release()
        release_memory()
    # ---- end of graph selection
    t0 = time.perf_counter()
    write_probes(out, cfg.dim, inv_gain)
    gcfg = genai_config(fw, ckpt, fused)
    (out / "genai_config.json").write_text(json.dumps(gcfg, indent=2))
    if ckpt is not None:
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(ckpt, cfg), indent=2))
    ops = _op_counts(onnx.load(out / MODEL, load_external_data=False))
    progress("onnx: ORT mobile format")
    to_ort_format(out / MODEL, out / ORT_MODEL)
    times["write_s"] = time.perf_counter() - t0
    return {
        "deploy_files": [MODEL, DATA],  # what a phone ships (model.ort is the same weights in ORT's format)
        "onnx": {
            "opset": OPSET,
            "model_bytes": (out / MODEL).stat().st_size + (out / DATA).stat().st_size,  # what onnxruntime(-genai) loads
            "ort_bytes": (out / ORT_MODEL).stat().st_size,
            "ops": ops,
            "graph": "fused" if fused else "traced",
            **{k: round(v, 2) for k, v in times.items()},
        },
    }


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    ops: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in ("MatMul", "MatMulNBits", "Gather", "GatherBlockQuantized"):
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops

"""Android: the folded Decoder as one ExecuTorch program (model.pte) lowered to XNNPACK.

Methods of the program:
  forward(tokens Long[1, n], input_pos Long[n]) -> logits [1, n, V]   n in 1..max_seq_len: prefill and decode
  embed(tokens Long[n]) -> [n, d]        unembed(hidden [n, d]) -> [n, V]   n in 1..V: the PIT interface probes
  get_max_seq_len, get_vocab_size, ... constants the ExecuTorch LLM runner (and the demo apps) read.

The KV cache is a static buffer per layer, written in place at start_pos = input_pos[0] by ExecuTorch's
llama::update_cache and read by llama::custom_sdpa up to the current position (CustomOpAttention); the program keeps
the buffers as mutable state between calls. Constants are shared between the methods (XNNPACK stores weights by
content hash).

Shared layouts: inside one .pte a table read by both the gather (a portable-kernel op reading the program's
constant segment) and the head matmul (XNNPACK's named data) is stored twice. Moved to an external model.ptd, both
land in one named-data store, which deduplicates by content: the fp32 table is stored once. So shared layouts
ship model.pte + model.ptd. Quantized heads are packed by XNNPACK in its own format, so only fp32 shares.

Above LEAN_ABOVE_BYTES of folded weights (256 MiB) lowering and writing run inside lean_lowering (lean_lowering.py,
patches in pit_export/compat): the same bytes, with the weights in memory once. Below it, ExecuTorch's own path.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim
from torch.export import export as torch_export

from pit_export.decoder import CachedAttention, Decoder, FoldedWeights
from pit_export.errors import BadInput
from pit_export.export.lean_lowering import LeanReport, lean_lowering, wants_lean
from pit_export.models.pit import allowed
from pit_export.quantize import Scheme

PTE, DATA_TAG = "model.pte", "model"  # weights file: DATA_TAG.ptd
METHODS = ("forward", "embed", "unembed")
# Rows per unembed call: its output (rows x V) is memory-planned at the bound, so V rows would plan a V x V buffer
# (9.7 GB at V = 49152). The session chunks larger requests.
UNEMBED_ROWS = 512


def probe_rows(cfg) -> dict[str, int]:
    return {"embed": cfg.vocab_size, "unembed": min(cfg.vocab_size, UNEMBED_ROWS)}


def load_custom_ops() -> None:
    """ExecuTorch's LLM kernels (llama::update_cache, llama::custom_sdpa): eager/export implementations and the
    runtime's kernels, both registered by this import. The Android LLM runner links the same ops."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401


class CustomOpAttention(CachedAttention):
    """Attention on ExecuTorch's LLM kernels, as its own Llama export does: the cache is [1, S, H_kv, hd], written
    in place by llama::update_cache at start_pos, and llama::custom_sdpa attends causally to positions
    <= start_pos + i only, reading grouped KV heads in place. Compared with the portable graph (index_copy_ into the
    cache, then attention over the whole static cache) a decode step reads only the filled part of the cache and no
    cache op falls outside the kernels. Positions must be consecutive (start_pos = input_pos[0]), as the Session
    protocol's prefill/decode always give them."""

    def __init__(self, cfg, layer: int = 0):
        super().__init__(cfg, layer)
        self.window, self.ring = cfg.sliding_window, ring_size(cfg) if self.sliding else None
        shape = (1, self.ring or cfg.max_seq_len, cfg.n_kv_heads, cfg.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)
        if self.ring:  # the position each ring slot holds, -1 for none
            self.register_buffer("slot_pos", torch.full((self.ring,), -1), persistent=False)
        self.max_seq_len = cfg.max_seq_len

    def forward(self, x, ropes, masks, input_pos):
        b, s, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.project(x, ropes))  # the kernels take [b, s, heads, hd]
        start = input_pos[0].item()
        torch._check_is_size(start)
        torch._check(start + s <= self.max_seq_len)
        if self.ring:
            return self.wo(self._ring_attention(q, k, v, start, input_pos).reshape(b, s, -1))
        torch.ops.llama.update_cache(k, self.k_cache, start)
        torch.ops.llama.update_cache(v, self.v_cache, start)
        # sliding layers below ring_size: the window as an additive [s, max_seq_len] mask over the same cache
        mask = torch.where(masks["sliding"], 0.0, float("-inf")) if self.sliding else None
        y = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start, mask, 0.0, mask is None, self.scale)
        return self.wo(y.reshape(b, s, -1))

    def _ring_attention(self, q, k, v, start, input_pos):
        """A sliding layer's ring buffer, as ExecuTorch's RingKVCache / CustomRingKVCache: 2 x window slots, position
        p in slot p mod ring (llama::update_cache_with_indices), the mask read from the positions the slots hold.
        Slots holding positions >= start are emptied first, so a prefill may rewind within what the ring holds, and a
        sequence's first call (start 0) empties every slot: ExecuTorch serializes no initial value for a mutated
        buffer, and none is needed. A call of s <= window + 1 tokens keeps every key its queries need (metadata:
        get_max_seq_len = window)."""
        idx = input_pos % self.ring
        self.slot_pos.copy_(torch.where(self.slot_pos >= start, -1, self.slot_pos))
        self.slot_pos.index_copy_(0, idx, input_pos)
        torch.ops.llama.update_cache_with_indices(k, self.k_cache, start, idx[None])
        torch.ops.llama.update_cache_with_indices(v, self.v_cache, start, idx[None])
        ok = allowed(input_pos, self.slot_pos, self.window) & (self.slot_pos >= 0)
        mask = torch.where(ok, 0.0, float("-inf"))
        return torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, 0, mask, 0.0, False, self.scale)

    def reset_cache(self) -> None:
        super().reset_cache()
        if self.ring:
            self.slot_pos.fill_(-1)


def ring_size(cfg) -> int | None:
    """Slots of a sliding layer's ring buffer (ExecuTorch's choice, 2 x window: a call of up to window tokens never
    overwrites a key its own queries need), or None where the full cache is no larger."""
    if not cfg.has_sliding or 2 * cfg.sliding_window >= cfg.max_seq_len:
        return None
    return 2 * cfg.sliding_window


class EtDecoder(Decoder):
    """The Decoder on ExecuTorch's LLM attention kernels, with the shared layouts' head as an nn.Linear on the same
    table Parameter.

    Same math and the same single Parameter as Decoder.head's F.linear(..., table.weight); being a module lets the
    quantizer see the head like any other linear (otherwise shared layouts would keep an fp32 head)."""

    def __init__(self, fw: FoldedWeights):
        load_custom_ops()
        # custom_sdpa has no score soft-capping: such models keep the portable attention (index_copy_ cache + SDPA)
        super().__init__(fw, CachedAttention if fw.cfg.attn_softcap is not None else CustomOpAttention)
        if self.layout != "untied":
            self.head_out = nn.Linear(self.cfg.dim, self.cfg.vocab_size, bias=False, device="meta")
            self.head_out.weight = self.table.weight

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(h) if self.layout == "untied" else self.head_out(self.head_proj(h))


class _Embed(nn.Module):
    def __init__(self, dec: Decoder):
        super().__init__()
        self.dec = dec

    def forward(self, tokens):
        return self.dec.embed(tokens)


class _Unembed(_Embed):
    def forward(self, hidden):
        return self.dec.unembed(hidden)


def _quantizable_linear(m: nn.Module, fqn: str) -> bool:
    # the d x d PIT transforms (T^-1, diag(g) T, diag(g) T^2) stay fp32: 2 d^2 weights that carry cond(T), and
    # quantizing them (weights and their dynamic int8 inputs) multiplies the error by up to cond(T)^2
    return isinstance(m, nn.Linear) and not fqn.endswith(("head_proj", "embed_proj"))


def quantize(dec: nn.Module, scheme: Scheme) -> None:
    """torchao recipes that XNNPACK lowers: dynamic int8 activations x int8/int4 weights; embedding weight-only."""
    from torchao.quantization import (
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        PerAxis,
        PerGroup,
        quantize_,
    )

    if scheme.linear_bits is not None:
        if scheme.activations != "int8-dynamic":
            raise BadInput(f"scheme {scheme.name}: XNNPACK lowers 4/8-bit linears only with dynamic int8 activations")
        gran = PerAxis(0) if scheme.group_size is None else PerGroup(scheme.group_size)
        cfg = Int8DynamicActivationIntxWeightConfig(
            weight_dtype=getattr(torch, f"int{scheme.linear_bits}"), weight_granularity=gran
        )
        quantize_(dec, cfg, filter_fn=_quantizable_linear)
    if scheme.embedding_bits is not None:
        cfg = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{scheme.embedding_bits}"), granularity=PerGroup(32))
        quantize_(dec, cfg, filter_fn=lambda m, _fqn: isinstance(m, nn.Embedding))


def metadata(cfg) -> dict:
    """Constant methods read by ExecuTorch's LLM runner (extension/llm/runner; keys as in export_llama_lib)."""
    return {
        "get_max_seq_len": max_call(cfg),  # tokens per forward call: the runner prefills longer prompts in chunks
        "get_max_context_len": cfg.max_seq_len,
        "get_vocab_size": cfg.vocab_size,
        "get_n_layers": cfg.n_layers,
        "get_bos_id": cfg.bos_id,
        "get_eos_ids": [cfg.eos_id],
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": True,  # llama::custom_sdpa + llama::update_cache
        "enable_dynamic_shape": True,  # the runner prefills the whole prompt in one forward call
    }


def max_call(cfg) -> int:
    """Tokens one forward call takes: the context, or the window where sliding layers keep a ring buffer."""
    return cfg.sliding_window if ring_size(cfg) else cfg.max_seq_len


def export_programs(dec: Decoder) -> dict:
    """torch.export of the three methods. Bounds are explicit: the mask is [n, max_seq_len] (no slicing by n), so
    the full context 1..max_seq_len survives as a dynamic range; embed/unembed take up to probe_rows() per call."""
    cfg = dec.cfg
    bounds = probe_rows(cfg)
    seq, rows = Dim("seq", min=1, max=max_call(cfg)), Dim("rows", min=1, max=bounds["embed"])
    hrows = Dim("hrows", min=1, max=bounds["unembed"])
    ex = torch.arange(2)
    with torch.no_grad():
        progs = {
            "forward": torch_export(dec, (ex[None], ex), dynamic_shapes=({1: seq}, {0: seq}), strict=False),
            "embed": torch_export(_Embed(dec), (ex,), dynamic_shapes=({0: rows},), strict=False),
            "unembed": torch_export(
                _Unembed(dec), (torch.zeros(2, cfg.dim),), dynamic_shapes=({0: hrows},), strict=False
            ),
        }
    dec.reset_cache()  # tracing ran the cache writes eagerly
    return progs


def tag_weights_external(programs: dict) -> None:
    """Send every lifted weight, including those XNNPACK consumes, to the one external named-data file."""
    for ep in programs.values():
        inputs = set(ep.graph_signature.user_inputs)
        for n in ep.graph.nodes:
            if n.op == "placeholder" and n.name not in inputs:
                n.meta.setdefault("custom", {})["delegate_constant_tag"] = DATA_TAG


def lower(programs: dict, constants: dict, external: bool):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    if external:
        tag_weights_external(programs)
    edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()], constant_methods=constants)
    # quant fusion turns dequantize + embedding into quantized_decomposed::embedding_{4,8}bit (the int table ships)
    cfg = ExecutorchBackendConfig(
        do_quant_fusion_and_const_prop=True, external_constants=(lambda _n: DATA_TAG) if external else False
    )
    return edge.to_executorch(cfg)


def lower_and_write(programs: dict, meta: dict, external: bool, out: Path, lean: bool) -> LeanReport:
    """Lower `programs`, write model.pte (+ model.ptd when `external`) into `out`; with `lean`, inside lean_lowering.
    The report names the lean patches that were in effect (none when not lean, or when all were outside their
    versions)."""

    def write(program) -> None:
        with open(Path(out) / PTE, "wb") as f:  # streams the program's segments: .buffer would join them into one copy
            program.write_to_file(f)
        if external:
            program.write_tensor_data_to_file(str(out))

    if not lean:
        write(lower(programs, meta, external))
        return LeanReport()
    with tempfile.TemporaryDirectory(prefix=".lowering-", dir=out) as spill, lean_lowering(Path(spill)) as report:
        program = lower(programs, meta, external)
        write(program)
        del program  # its spilled blobs are removed with it, before their folder
    return report


def export(fw: FoldedWeights, scheme: Scheme, out: Path, ckpt, progress) -> dict:
    t0 = time.perf_counter()
    dec = EtDecoder(fw)
    progress(f"quantize ({scheme.name})")
    quantize(dec, scheme)
    progress("torch.export")
    programs = export_programs(dec)
    t1 = time.perf_counter()
    lean = wants_lean(fw.nbytes)
    progress("lower to XNNPACK" + (" (lean lowering)" if lean else ""))
    meta = metadata(fw.cfg)
    external = fw.layout != "untied"  # the only way ExecuTorch keeps one copy of a shared table
    applied = lower_and_write(programs, meta, external, out, lean).applied
    t2 = time.perf_counter()
    return {
        "deploy_files": [PTE] + ([f"{DATA_TAG}.ptd"] if external else []),
        "executorch": {
            "program": PTE,
            "data": f"{DATA_TAG}.ptd" if external else None,
            "methods": list(METHODS),
            "probe_rows": probe_rows(fw.cfg),
            "metadata": meta,
            "needs_quantized_kernels": scheme.embedding_bits is not None,
            "needs_custom_ops": True,  # llama::update_cache, llama::custom_sdpa
            "lean_lowering": applied,  # the compat patches lowering ran with (none below LEAN_ABOVE_BYTES)
            "export_seconds": round(t1 - t0, 2),
            "lower_seconds": round(t2 - t1, 2),
        },
    }

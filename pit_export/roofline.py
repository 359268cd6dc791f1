"""Decode is memory-bandwidth bound on phones: every step streams all linear weights and the head table, one
embedding row and the KV cache written so far. Bytes per decoded token, the host's measured bandwidth, the host
roofline and bandwidth projections for named phone profiles (projections, not measurements)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Phone:
    bandwidth_gbs: float  # effective (sustained read) DRAM bandwidth a single app sees, not the spec sheet peak
    note: str


PHONES: dict[str, Phone] = {
    "flagship LPDDR5X": Phone(60.0, "e.g. Snapdragon 8 Gen 3 / Dimensity 9300 class, ~60 GB/s effective"),
    "mid-range LPDDR4X": Phone(25.0, "e.g. Snapdragon 7-series class, ~25 GB/s effective"),
    "entry LPDDR4": Phone(12.0, "e.g. Helio G-series class, ~12 GB/s effective"),
}


@dataclass
class TokenBytes:
    """Bytes one decode step at context length `context` reads."""

    streamed: int  # tensors read in full every step: linear weights, head table (shared or not), norms
    gather_tables: int  # tensors only gathered from (an untied embedding table): stored, but one row read per token
    gather_row: int  # that one row (table bytes / vocab: includes its quantization scales)
    kv_read: int  # fp32 K and V of every layer for the `context` positions attended
    context: int
    total: int
    formula: str = "streamed + gather_tables / vocab + n_layers * 2 * n_kv_heads * head_dim * 4 B * context"


def _onnx_weights(path: Path) -> dict[str, tuple[int, set[str]]]:
    """initializer -> (stored bytes, op types that consume it), read from the graph without loading the data."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    users: dict[str, set[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, set()).add(n.op_type)
    out = {}
    for t in model.graph.initializer:
        if uses_external_data(t):
            size = int(next(e.value for e in t.external_data if e.key == "length"))
        else:
            size = len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
        out[t.name] = (size, users.get(t.name, set()))
    return out


def _pte_weights(path: Path) -> dict[str, tuple[int, set[str]]]:
    """A .pte's weights: named buffers (XNNPACK packs its weights there, deduplicated across methods) are read by
    forward's delegate calls; inline constants by the forward kernels that take them (none: only the probe
    methods read them)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(path.read_bytes())
    prog = pte.program
    fwd = next(e for e in prog.execution_plan if e.name == "forward")
    users: dict[int, set[str]] = {}
    for ins in fwd.chains[0].instructions:
        a = ins.instr_args
        op = fwd.operators[a.op_index].name if hasattr(a, "op_index") else "delegate"
        for i in getattr(a, "args", []):
            idx = getattr(fwd.values[i].val, "data_buffer_idx", 0)
            if idx:
                users.setdefault(idx, set()).add(op)
    out = {f"constant[{i}]": (len(b.storage), users.get(i, set())) for i, b in enumerate(prog.constant_buffer) if i}
    named = pte.named_data.buffers if pte.named_data else []
    out |= {f"named[{i}]": (len(b), {"delegate"}) for i, b in enumerate(named)}
    return out


def _ptd_weights(path: Path) -> dict[str, tuple[int, set[str]]]:
    """External weights (shared layouts): the shared table, read by the head every step."""
    return {path.name: (path.stat().st_size, {"delegate"})}


# deployed file suffix -> reader: tensor -> (stored bytes, ops of the decode graph reading it; empty: not read)
READERS = {
    ".onnx": _onnx_weights,
    ".data": lambda path: {},  # ONNX external data: counted through the .onnx initializers that point into it
    ".pte": _pte_weights,
    ".ptd": _ptd_weights,
}


def _is_gather(op: str) -> bool:
    return op in ("Gather", "GatherBlockQuantized") or "embedding" in op


def weight_split(folder: Path, meta: dict) -> tuple[int, int]:
    """(streamed, gather-only) bytes of the deployed weights that one decode step reads, tensor by tensor: a tensor
    only gathered from (an untied embedding table) costs one row per token; one also read by a matmul (a shared
    table) is streamed in full; one the decode graph never reads (probe methods' own constants) costs nothing."""
    from pit_export.errors import BadInput

    weights: dict[str, tuple[int, set[str]]] = {}
    for f in meta["deploy_files"]:
        reader = READERS.get(Path(f).suffix)
        if reader is None:
            raise BadInput(f"{folder / f}: no weight reader for {Path(f).suffix} files (known: {', '.join(READERS)})")
        weights |= {f"{f}:{k}": v for k, v in reader(folder / f).items()}
    gather = sum(b for b, ops in weights.values() if ops and all(_is_gather(o) for o in ops))
    streamed = sum(b for b, ops in weights.values() if ops and not all(_is_gather(o) for o in ops))
    return streamed, gather


def kv_bytes(cfg: dict, context: int) -> int:
    head_dim = cfg.get("head_size") or cfg["dim"] // cfg["n_heads"]
    return cfg["n_layers"] * 2 * cfg["n_kv_heads"] * head_dim * 4 * context


def token_bytes(folder: Path, meta: dict, context: int) -> TokenBytes:
    cfg = meta["config"]
    streamed, gather = weight_split(Path(folder), meta)
    row = gather // cfg["vocab_size"]
    # every deployed decoder reads only the positions filled so far: ONNX grows past/present, the .pte's
    # llama::custom_sdpa stops at start_pos, the .mlpackage slices its state to the current end
    kv = kv_bytes(cfg, context)
    return TokenBytes(streamed, gather, row, kv, context, streamed + row + kv)


def host_bandwidth(mb: int = 256, repeats: int = 5) -> dict:
    """STREAM-like single-thread numpy tests on arrays far larger than any last-level cache; best of `repeats`.
    copy counts read + write (STREAM convention); read is a sum, which is what decode does to weights."""
    n = mb * 2**20 // 8
    a = np.ones(n)
    b = np.empty_like(a)
    copy, read = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        copy.append(time.perf_counter() - t)
        t = time.perf_counter()
        a.sum()
        read.append(time.perf_counter() - t)
    return {
        "array_mb": mb,
        "copy_gbs": 2 * a.nbytes / min(copy) / 1e9,
        "read_gbs": a.nbytes / min(read) / 1e9,
        "threads": 1,
    }


def projection(tb: TokenBytes, host_bw_gbs: float, decode_tok_s: float) -> dict:
    """The host roofline and what fraction of it the measured decode reached; the phone numbers are projections:
    roofline (bandwidth / bytes) is an upper bound, 'at host efficiency' scales it by the host's measured fraction."""
    roof = host_bw_gbs * 1e9 / tb.total
    frac = decode_tok_s / roof
    return {
        "bytes_per_token": asdict(tb),
        "host_roofline_tok_s": roof,
        "host_decode_tok_s": decode_tok_s,  # from the median step (contention-robust)
        "host_roofline_fraction": frac,
        "phones_projected": {
            name: {
                "bandwidth_gbs": p.bandwidth_gbs,
                "note": p.note,
                "roofline_tok_s": p.bandwidth_gbs * 1e9 / tb.total,
                "at_host_efficiency_tok_s": p.bandwidth_gbs * 1e9 / tb.total * frac,
            }
            for name, p in PHONES.items()
        },
        "label": "PROJECTION from bytes/token and assumed phone bandwidth, not a phone measurement",
    }

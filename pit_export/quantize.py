"""Quantization schemes by name. The choices shared by all backends live here (which weights, bits, group size);
each backend turns a Scheme into its own recipe (torchao for ExecuTorch, ORT quantizers for ONNX,
coremltools.optimize for CoreML)."""

from __future__ import annotations

from dataclasses import dataclass

from pit_export.errors import BadInput


@dataclass(frozen=True)
class Scheme:
    name: str
    linear_bits: int | None  # body + head matmul weights; None = float
    activations: str  # "float" | "int8-dynamic"
    group_size: int | None  # per-group weight scales (None = per-channel)
    embedding_bits: int | None = None  # gather table; None = float
    description: str = ""
    backends: tuple[str, ...] | None = None  # the exporters that implement it; None = all


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("fp32", None, "float", None, description="no quantization"),
        Scheme("int8", 8, "int8-dynamic", None, description="8-bit per-channel weights, dynamic int8 activations"),
        Scheme("8da4w", 4, "int8-dynamic", 32, description="4-bit per-group(32) weights, dynamic int8 activations"),
        Scheme("int4", 4, "float", 32, description="4-bit per-group(32) weights (weight-only)"),
        Scheme("fp16", None, "float", None, description="fp16 weights and compute", backends=("coreml",)),
        Scheme(
            "palettize4",
            4,
            "float",
            8,  # rows per lookup table: 16 rows cost ppl x1.034 on pit-tiny (int4 block 32: x1.019), 8 rows x1.029
            description="4-bit k-means lookup tables per group of 8 rows (weight-only)",
            backends=("coreml",),
        ),
    )
}


def get_scheme(name: str, embedding_bits: int | None = None) -> Scheme:
    if name not in SCHEMES:
        raise BadInput(f"unknown scheme {name!r} (choose from {', '.join(SCHEMES)})")
    if embedding_bits not in (None, 4, 8):
        raise BadInput(f"embedding bits must be 4 or 8, got {embedding_bits}")
    s = SCHEMES[name]
    if embedding_bits is None:
        return s
    return Scheme(
        f"{s.name}+emb{embedding_bits}",
        s.linear_bits,
        s.activations,
        s.group_size,
        embedding_bits,
        s.description + f", {embedding_bits}-bit embedding",
        s.backends,
    )


def gate_key(scheme_name: str) -> str:
    """Gates are keyed by the base scheme: 8da4w+emb4 is gated like 8da4w."""
    return scheme_name.split("+")[0]

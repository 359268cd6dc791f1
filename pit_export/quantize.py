"""Quantization schemes by name, and what each name means on each backend.

A Scheme holds the choices shared by all backends (which weights, bits, group size, activations); each exporter turns
it into its own toolchain's recipe (torchao for ExecuTorch, onnxruntime's MatMulNBits quantizer for ONNX,
coremltools.optimize for CoreML). Where a backend cannot honour a choice exactly it differs, and RECIPES below says
how, in one place: the exporters implement these lines and refuse the schemes marked unsupported."""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    calibration: str | None = None  # None: the backend's round to nearest; "table" / "all": GPTQ (ROUNDINGS below)


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


# scheme -> backend -> the recipe that backend applies (None: not available there, exit 2)
RECIPES: dict[str, dict[str, str | None]] = {
    "fp32": {
        "executorch": "fp32 weights and compute (XNNPACK fp32 kernels)",
        "onnx": "fp32 weights and compute",
        "coreml": "fp32 compute; the KV state is an fp16 hi + lo pair (CoreML states are fp16)",
    },
    "int8": {
        "executorch": "torchao Int8DynamicActivationIntxWeight: int8 per-channel weights, dynamic int8 activations",
        "onnx": "MatMulNBits 8-bit symmetric, blocks of 32 (not per-channel), accuracy_level 4: int8 compute per block",
        "coreml": "linear_quantize_weights int8 per-channel, weight-only: activations stay fp16",
    },
    "8da4w": {
        "executorch": "torchao Int8DynamicActivationIntxWeight: int4 weights per group of 32, dynamic int8 activations",
        "onnx": "MatMulNBits 4-bit symmetric, blocks of 32, accuracy_level 4: int8 compute per block; d x d 8-bit",
        "coreml": None,  # CoreML has no dynamic int8 activations
    },
    "int4": {
        "executorch": None,  # XNNPACK lowers 4-bit linears only with dynamic int8 activations: use 8da4w
        "onnx": "MatMulNBits 4-bit symmetric, blocks of 32, float compute; d x d transforms 8-bit",
        "coreml": "linear_quantize_weights int4 per block of 32 (iOS 18 blockwise), weight-only, fp16 activations; "
        "calibrated rounding also stores the d x d transforms at int8 per channel",
    },
    "fp16": {"executorch": None, "onnx": None, "coreml": "fp16 weights and compute"},
    "palettize4": {
        "executorch": None,
        "onnx": None,
        "coreml": "4-bit k-means lookup table per group of 8 rows (constexpr_lut_to_dense), fp16 activations",
    },
}
# ONNX stores every MatMulNBits / GatherBlockQuantized block symmetrically, as the onnxruntime-genai builder does: codes
# around an implicit zero point 2^(bits-1), scale = the block's signed extreme / -2^(bits-1), no zero-point tensors.
ONNX_SYMMETRIC = True
# embedding_bits (+embN): the gather table, weight-only 4/8-bit per group of 32 on ExecuTorch (torchao
# IntxWeightOnly); on ONNX 4-bit only, and only in the untied layout (GatherBlockQuantized; the compact layouts'
# one table takes the head's precision); not on CoreML (its gather weights follow the scheme).
# The d x d PIT transforms stay fp16 on CoreML (they carry cond(T)) except with calibrated rounding (int8 per channel,
# GPTQ-rounded); fp32 on ExecuTorch; on ONNX 8-bit MatMulNBits blocks of 32 under every quantized scheme (4-bit
# transforms double the KL of pit-tiny's preset; export/onnx.py transform_nodes).


def recipe(scheme: Scheme | str, backend: str) -> str:
    """What `scheme` means on `backend`; BadInput where that backend does not implement it."""
    name = scheme if isinstance(scheme, str) else scheme.name
    base = name.split("+")[0]
    meaning = RECIPES.get(base, {}).get(backend)
    if meaning is None:
        where = [b for b, r in RECIPES.get(base, {}).items() if r is not None]
        raise BadInput(f"scheme {name} is not available on {backend} (available on: {', '.join(where) or 'none'})")
    return meaning


# Rounding, an option of every scheme with 4-bit weights: "rtn" (each backend's round to nearest) or GPTQ on
# training-split activations, producing weights that lie on the backend's own grid so that its round to nearest stores
# GPTQ's codes (calibrate.py). It is not part of the scheme's name (the format, what the gates key on): artifacts
# record it as "rounding". A name may carry it as a suffix: 8da4w+gptq-all.
ROUNDINGS = {
    "rtn": None,
    "gptq": "table",  # the V x d tables (head and embedding) only
    "gptq-all": "all",  # every 4-bit weight: tables and body linears (and the d x d transforms where quantized)
}


def get_scheme(name: str, embedding_bits: int | None = None, rounding: str | None = None) -> Scheme:
    """A scheme by name: BASE[+embN][+ROUNDING]; embedding_bits and rounding, when given, take precedence over the
    name's suffixes. A rounding other than rtn needs a 4-bit weight to act on (BadInput otherwise)."""
    base, *suffixes = name.split("+")
    if base not in SCHEMES:
        raise BadInput(f"unknown scheme {name!r} (choose from {', '.join(SCHEMES)})")
    for suffix in suffixes:
        if suffix in ROUNDINGS:
            rounding = rounding or suffix
        elif suffix in ("emb4", "emb8"):
            embedding_bits = embedding_bits if embedding_bits is not None else int(suffix[3:])
        else:
            raise BadInput(f"unknown scheme option {suffix!r} in {name!r} (emb4, emb8, {', '.join(ROUNDINGS)})")
    if embedding_bits not in (None, 4, 8):
        raise BadInput(f"embedding bits must be 4 or 8, got {embedding_bits}")
    check_rounding(rounding)
    s = SCHEMES[base]
    calibration = ROUNDINGS[rounding or "rtn"]
    if calibration is not None and not has_4bit(s, embedding_bits):
        raise BadInput(f"rounding {rounding} applies to 4-bit weights on a uniform grid: scheme {name} has none")
    if embedding_bits is not None:
        s = Scheme(
            f"{s.name}+emb{embedding_bits}",
            s.linear_bits,
            s.activations,
            s.group_size,
            embedding_bits,
            s.description + f", {embedding_bits}-bit embedding",
            s.backends,
        )
    return replace(s, calibration=calibration) if calibration else s


def has_4bit(s: Scheme, embedding_bits: int | None = None) -> bool:
    """Whether the scheme has 4-bit weights on a uniform grid for GPTQ (palettize4: k-means tables, no grid)."""
    linear = s.linear_bits == 4 and s.name.split("+")[0] != "palettize4"
    return linear or (embedding_bits or s.embedding_bits) == 4


def check_rounding(rounding: str | None) -> None:
    if rounding is not None and rounding not in ROUNDINGS:
        raise BadInput(f"unknown rounding {rounding!r} (choose from {', '.join(ROUNDINGS)})")


def rounding_name(s: Scheme) -> str:
    return next(k for k, v in ROUNDINGS.items() if v == s.calibration)


def gate_key(scheme_name: str) -> str:
    """Gates are keyed by the base scheme: 8da4w+emb4 is gated like 8da4w."""
    return scheme_name.split("+")[0]

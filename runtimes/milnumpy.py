"""A numpy evaluator of a saved CoreML ML program: the Linux stand-in for the CoreML runtime.

It reads what ships, nothing else: the package's MIL protobuf (model.mlmodel) for the ops and their wiring, and
weight.bin for the weights (blob headers parsed here). Each function runs op by op in program order. Numerics follow
the program's declared types: every op's result is cast to its declared output dtype, so an fp16 program stores each
intermediate in fp16 (arithmetic itself in fp32, as accumulators on the devices are). Compressed weights
(constexpr_* ops) are expanded once at load, as the runtime does. An op this module does not implement fails at load
with its name: a silent skip would be a wrong answer.

This is not CoreML: kernels, fusion and accumulation order on the device differ. It proves the saved program, its
weights and its state updates compute the model; on macOS the real MLModel.predict is used instead.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# MIL DataType enum (MIL.proto) -> numpy; sub-byte types are unpacked into 8-bit integers
DTYPES = {
    1: np.bool_, 2: np.str_, 10: np.float16, 11: np.float32, 12: np.float64, 21: np.int8, 22: np.int16,
    23: np.int32, 24: np.int64, 25: np.int8, 31: np.uint8, 32: np.uint16, 33: np.uint32, 34: np.uint64,
    35: np.uint8, 36: np.uint8, 37: np.uint8, 38: np.uint8, 39: np.uint8,
}  # fmt: skip
SUB_BYTE = {25: (4, True), 35: (4, False), 36: (2, False), 37: (1, False), 38: (6, False), 39: (3, False)}
CAST_NAMES = {
    "fp16": np.float16,
    "fp32": np.float32,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "bool": np.bool_,
}
BLOB_SENTINEL = 0xDEADBEEF
TUPLE_INPUTS = {"values"}  # inputs that are variadic tuples (concat)


class MilError(RuntimeError):
    """A program this evaluator cannot run (unknown op or type): raised at load, never skipped."""


def _unpack_bits(raw: np.ndarray, nbits: int, signed: bool, count: int) -> np.ndarray:
    bits = np.unpackbits(raw.astype(np.uint8), bitorder="little")[: count * nbits].reshape(count, nbits)
    vals = (bits.astype(np.int32) << np.arange(nbits)).sum(1)
    if signed:
        vals = np.where(vals >= 1 << (nbits - 1), vals - (1 << nbits), vals)
    return vals.astype(np.int8 if signed else np.uint8)


@dataclass
class BlobFile:
    """weight.bin: per blob a 64-byte header (sentinel, MIL dtype, size in bytes, data offset) then the data."""

    data: bytes | mmap.mmap  # the file mapped read-only: weights are views into it, shared by every function

    def read(self, offset: int, dtype: int, shape: tuple[int, ...]) -> np.ndarray:
        sentinel, _blob_dtype, size, start = struct.unpack_from("<IIQQ", self.data, offset)
        if sentinel != BLOB_SENTINEL:
            raise MilError(f"weight.bin: no blob header at offset {offset}")
        raw = np.frombuffer(self.data, np.uint8, size, start)
        count = int(np.prod(shape, dtype=np.int64))
        if dtype in SUB_BYTE:
            return _unpack_bits(raw, *SUB_BYTE[dtype], count).reshape(shape)
        return raw.view(DTYPES[dtype])[:count].reshape(shape)  # read-only: an op that wrote to a weight would raise


def _map(path: Path) -> bytes | mmap.mmap:
    if path.stat().st_size == 0:
        return b""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _shape(tensor_type) -> tuple[int, ...] | None:
    dims = [d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in tensor_type.dimensions]
    return None if None in dims else tuple(dims)


def _value(v, blobs: BlobFile):
    """A MIL Value (immediate or in weight.bin) as a numpy array (or str)."""
    tt = v.type.tensorType
    dtype, shape = tt.dataType, _shape(tt)
    if v.WhichOneof("value") == "blobFileValue":
        return blobs.read(v.blobFileValue.offset, dtype, shape)
    t = v.immediateValue.tensor
    kind = t.WhichOneof("value")
    if kind == "strings":
        return t.strings.values[0] if not shape else np.array(t.strings.values)
    if kind == "bytes":
        raw = np.frombuffer(t.bytes.values, np.uint8)
        if dtype in SUB_BYTE:
            return _unpack_bits(raw, *SUB_BYTE[dtype], int(np.prod(shape))).reshape(shape)
        return raw.view(DTYPES[dtype]).reshape(shape).copy()
    return np.array(list(getattr(t, kind).values), dtype=DTYPES[dtype]).reshape(shape)


@dataclass
class Op:
    type: str
    inputs: dict[str, list]  # input name -> bindings: a variable name (str) or a constant array
    outputs: list[tuple[str, object]]  # (name, numpy dtype)


@dataclass
class MilFunction:
    name: str
    inputs: list[str]
    states: list[str]
    state_shapes: dict[str, tuple[int, ...]]
    outputs: list[str]
    ops: list[Op]
    consts: dict[str, object] = field(default_factory=dict)
    expanded: list[str] = field(default_factory=list)  # the constexpr op types expanded at load
    _dead: list[list[str]] | None = field(default=None, init=False, repr=False)  # per op: values read last there

    def run(self, feeds: dict[str, np.ndarray], states: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Evaluate with inputs `feeds`; `states` (name -> array) is read and updated in place. Each intermediate is
        dropped after its last reader, as a runtime's memory planner would: a 30-layer prefill kept every
        activation of every layer alive until the end (~0.9 GB at 135M parameters and 256 positions)."""
        if self._dead is None:
            self._dead = _dead_after(self.ops, self.outputs)
        env = dict(self.consts)
        for name in self.inputs:
            env[name] = np.asarray(feeds[name])
        for name in self.states:
            env[name] = StateRef(states, name)
        for op, dead in zip(self.ops, self._dead, strict=True):
            _execute(op, env)
            for name in dead:
                del env[name]
        return {name: env[name] for name in self.outputs}


def _dead_after(ops: list[Op], outputs: list[str]) -> list[list[str]]:
    last = {b: i for i, op in enumerate(ops) for binds in op.inputs.values() for b in binds if isinstance(b, str)}
    dead: list[list[str]] = [[] for _ in ops]
    for name, i in last.items():
        if name not in outputs:
            dead[i].append(name)
    return dead


@dataclass
class StateRef:
    store: dict
    name: str


def _resolve(op: Op, env: dict) -> dict:
    args = {}
    for key, binds in op.inputs.items():
        vals = [env[b] if isinstance(b, str) else b for b in binds]
        args[key] = vals if key in TUPLE_INPUTS else vals[0]
    return args


def _execute(op: Op, env: dict) -> None:
    res = KERNELS[op.type](**_resolve(op, env))
    res = res if isinstance(res, tuple) else (res,)
    for (name, dtype), r in zip(op.outputs, res, strict=True):
        env[name] = np.asarray(r).astype(dtype, copy=False) if dtype is not None else r


def load_program(package: Path) -> dict[str, MilFunction]:
    """All functions of a .mlpackage, consts and constexpr ops evaluated once."""
    from pit_export.compat.coremltools import import_coremltools

    import_coremltools()
    from coremltools.proto import Model_pb2  # the protobuf schema only

    package = Path(package)
    manifest = json.loads((package / "Manifest.json").read_text())
    root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"]
    spec_path = package / "Data" / root
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    weights = spec_path.parent / "weights" / "weight.bin"
    blobs = BlobFile(_map(weights) if weights.is_file() else b"")
    return {name: _function(name, fn, blobs) for name, fn in spec.mlProgram.functions.items()}


def _function(name: str, fn, blobs: BlobFile) -> MilFunction:
    block = fn.block_specializations[fn.opset]
    unknown = sorted({op.type for op in block.operations} - set(KERNELS) - {"const"})
    if unknown:
        raise MilError(f"MIL op(s) not implemented by the numpy evaluator: {', '.join(unknown)} (function {name})")
    states = [i.name for i in fn.inputs if i.type.WhichOneof("type") == "stateType"]
    f = MilFunction(
        name,
        inputs=[i.name for i in fn.inputs if i.name not in states],
        states=states,
        state_shapes={i.name: _shape(i.type.stateType.wrappedType.tensorType) for i in fn.inputs if i.name in states},
        outputs=list(block.outputs),
        ops=[],
    )
    for proto_op in block.operations:
        if proto_op.type == "const":
            f.consts[proto_op.outputs[0].name] = _value(proto_op.attributes["val"], blobs)
            continue
        op = Op(
            proto_op.type,
            {
                k: [b.name if b.WhichOneof("binding") == "name" else _value(b.value, blobs) for b in a.arguments]
                for k, a in proto_op.inputs.items()
            },
            [(o.name, _out_dtype(o.type)) for o in proto_op.outputs],
        )
        if op.type.startswith("constexpr_"):  # weights only: expand once, like the runtime at load
            _execute(op, f.consts)
            f.expanded.append(op.type)
        else:
            f.ops.append(op)
    return f


def _out_dtype(value_type):
    if value_type.WhichOneof("type") != "tensorType":
        return None
    dtype = value_type.tensorType.dataType
    if dtype not in DTYPES or dtype in SUB_BYTE:
        raise MilError(f"MIL output type {dtype} not supported")
    return DTYPES[dtype]


# ---- kernels: MIL op semantics (coremltools.converters.mil.mil.ops.defs), in numpy --------------------------------


def _f32(x):
    """fp16 operands are computed in fp32; the result is rounded to the declared output dtype by _execute."""
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == np.float16 else x


def _slices(shape, begin, end, stride, begin_mask, end_mask, squeeze_mask):
    rank = len(shape)
    stride = np.ones(rank, int) if stride is None else stride
    begin_mask = np.zeros(rank, bool) if begin_mask is None else begin_mask
    end_mask = np.zeros(rank, bool) if end_mask is None else end_mask
    idx = []
    for i in range(rank):
        b = None if begin_mask[i] else int(begin[i])
        e = None if end_mask[i] else int(end[i])
        idx.append(slice(b, e, int(stride[i])))
    if squeeze_mask is not None and np.any(squeeze_mask):
        raise MilError("slice with squeeze_mask is not implemented")
    return tuple(idx)


def slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    return x[_slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)]


def slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    out = np.array(x, copy=True)
    out[_slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)] = update
    return out


def read_state(input):  # noqa: A002  (MIL's argument name)
    return input.store[input.name]


def write_state(input, data):  # noqa: A002
    if data.dtype != input.store[input.name].dtype:
        raise MilError(f"state {input.name}: write of {data.dtype} into {input.store[input.name].dtype}")
    input.store[input.name] = np.array(data, copy=True)
    return ()


def coreml_update_state(state, value):  # write_state then read_state (the in-memory form of the same update)
    write_state(state, value)
    return value


def reshape(x, shape):
    shape = [x.shape[i] if s == 0 else int(s) for i, s in enumerate(shape)]
    return x.reshape(shape)


def gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    if int(batch_dims) != 0:
        raise MilError("gather with batch_dims is not implemented")
    return np.take(x, indices, axis=int(axis))


def split(x, axis, num_splits=None, split_sizes=None):
    if split_sizes is not None:
        return tuple(np.split(x, np.cumsum(split_sizes)[:-1], axis=int(axis)))
    return tuple(np.split(x, int(num_splits), axis=int(axis)))


def concat(values, axis, interleave=False):
    if bool(interleave):
        raise MilError("interleaved concat is not implemented")
    return np.concatenate([np.atleast_1d(v) for v in values], axis=int(axis))


def linear(x, weight, bias=None):
    y = _f32(x) @ _f32(weight).T
    return y if bias is None else y + _f32(bias)


def matmul(x, y, transpose_x=False, transpose_y=False):
    x, y = _f32(x), _f32(y)
    return (np.swapaxes(x, -1, -2) if transpose_x else x) @ (np.swapaxes(y, -1, -2) if transpose_y else y)


def softmax(x, axis=-1):
    x = _f32(x)
    e = np.exp(x - x.max(axis=int(axis), keepdims=True))
    return e / e.sum(axis=int(axis), keepdims=True)


def scaled_dot_product_attention(query, key, value, attn_mask=None):
    scores = _f32(query) @ np.swapaxes(_f32(key), -1, -2) / np.sqrt(query.shape[-1])
    if attn_mask is not None:
        scores = np.where(attn_mask, scores, -np.inf) if attn_mask.dtype == np.bool_ else scores + _f32(attn_mask)
    return softmax(scores, -1) @ _f32(value)


def gelu(x, mode="EXACT"):
    x = _f32(x)
    if mode == "TANH_APPROXIMATION":
        return np.float32(0.5) * x * (1 + np.tanh(np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x**3)))
    if mode == "EXACT":
        from math import erf

        return (0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))).astype(np.float32)
    raise MilError(f"gelu mode {mode} is not implemented")


def blockwise_shift_scale(data, scale, offset=None):
    """constexpr_blockwise_shift_scale: scale * (data - offset), scale/offset repeated over blocks of data."""

    def expand(t):
        for axis, (n, m) in enumerate(zip(data.shape, t.shape, strict=True)):
            t = np.repeat(t, n // m, axis=axis)
        return t

    d = data.astype(np.float32)
    if offset is not None:
        d = d - expand(offset.astype(np.float32))
    return d * expand(_f32(scale))


def lut_to_dense(indices, lut, vector_axis=None):
    """constexpr_lut_to_dense (iOS 18): lut [*groups, 2^nbits, vector]; group g of axis i covers n_i / groups_i."""
    if lut.shape[-1] != 1:
        raise MilError("vector palettization is not implemented")
    grid = np.meshgrid(
        *[np.arange(n) // (n // g) for n, g in zip(indices.shape, lut.shape[:-2], strict=True)], indexing="ij"
    )
    return lut[(*grid, indices.astype(np.int64), 0)]


def _axes(axes):
    return None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))


def _binary(fn):
    return lambda x, y: fn(_f32(x), _f32(y))


KERNELS = {
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _binary(np.divide),
    "pow": _binary(np.power),
    "maximum": _binary(np.maximum),
    "minimum": _binary(np.minimum),
    "equal": _binary(np.equal),
    "not_equal": _binary(np.not_equal),
    "greater": _binary(np.greater),
    "greater_equal": _binary(np.greater_equal),
    "less": _binary(np.less),
    "less_equal": _binary(np.less_equal),
    "logical_and": np.logical_and,
    "select": lambda cond, a, b: np.where(cond, _f32(a), _f32(b)),
    "cast": lambda x, dtype: np.asarray(x).astype(CAST_NAMES[dtype]),
    "identity": lambda x: x,
    "shape": lambda x: np.array(np.shape(x), np.int32),
    "expand_dims": lambda x, axes: np.expand_dims(x, _axes(axes)),
    "squeeze": lambda x, axes=None: np.squeeze(x, _axes(axes)),
    "transpose": lambda x, perm: np.transpose(x, perm),
    "reshape": reshape,
    "tile": lambda x, reps: np.tile(x, reps),
    "concat": concat,
    "split": split,
    "gather": gather,
    "slice_by_index": slice_by_index,
    "slice_update": slice_update,
    "range_1d": lambda start, end, step: np.arange(start, end, step),
    "reduce_mean": lambda x, axes=None, keep_dims=False: _f32(x).mean(axis=_axes(axes), keepdims=bool(keep_dims)),
    "reduce_sum": lambda x, axes=None, keep_dims=False: _f32(x).sum(axis=_axes(axes), keepdims=bool(keep_dims)),
    "rsqrt": lambda x, epsilon=1e-12: 1.0 / np.sqrt(_f32(x) + np.float32(epsilon)),
    "sqrt": lambda x: np.sqrt(_f32(x)),
    "exp": lambda x: np.exp(_f32(x)),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-_f32(x))),
    "silu": lambda x: _f32(x) / (1.0 + np.exp(-_f32(x))),
    "tanh": lambda x: np.tanh(_f32(x)),
    "gelu": gelu,
    "softmax": softmax,
    "linear": linear,
    "matmul": matmul,
    "scaled_dot_product_attention": scaled_dot_product_attention,
    "read_state": read_state,
    "write_state": write_state,
    "coreml_update_state": coreml_update_state,
    "constexpr_blockwise_shift_scale": blockwise_shift_scale,
    "constexpr_lut_to_dense": lut_to_dense,
}

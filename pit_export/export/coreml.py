"""iOS: the folded Decoder as one CoreML ML program (model.mlpackage, iOS 18), KV cache as model state.

Functions of the multifunction package (one weight.bin, each distinct constant stored once; see merge_functions):
  main(tokens Int32[1, n], causal_mask Float32[1, 1, n, end]) -> logits [1, n, V]
        n in 1..max_seq_len, end = start + n <= max_seq_len. One function with a flexible length serves both
        prefill (n > 1) and decode (n = 1): it converts with states, and two fixed-shape functions would need a
        padded prefill. Positions start..end-1 come from the shapes; the additive mask is the caller's (the usual
        CoreML LLM interface), 0 where allowed and MASK_NEG elsewhere.
  embed(tokens Int32[n]) -> [n, d]      unembed(hidden Float32[n, d]) -> [n, V]    the PIT interface probes

The cache is one state per layer and k/v, written by slice assignment (`cache[:, :, start:end] = k`, converted to
read_state, slice_update, write_state). CoreML states must be fp16. The fp16 program keeps k/v as they are computed;
the fp32 program stores each as an fp16 pair hi + lo (k = hi + lo to ~2^-22 relative), as many bytes as an fp32
cache, so its logits stay within the fp32 gate.

Schemes: fp16 (compute and weights fp16, the default precision), fp32 (compute fp32), and compressed weights on the
fp16 program: int8 (per-channel), int4 (per-block 32, iOS 18 blockwise), palettize4 (4-bit k-means lookup tables per
group of 8 rows, constexpr_lut_to_dense). All are weight-only: activations stay fp16 (CoreML's int8 is not the
dynamic-int8 of the other backends). Compression applies to linear, matmul and gather weights only: the RoPE tables
feed slices and the mask is an input, so both stay exact; the d x d PIT transforms are excluded by name (they carry
cond(T)).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from pit_export.compat.coremltools import BLOB_KINDS, blob_storage, causal_mask, import_coremltools
from pit_export.decoder import CachedAttention, Decoder, EntryPoint, FoldedWeights
from pit_export.errors import BadInput
from pit_export.memory import FORK_ABOVE_BYTES, release_memory, run_forked
from pit_export.models.checkpoint import scratch_dir
from pit_export.quantize import Scheme

import_coremltools()  # before any "import coremltools" below (the first import decides what it pulls in)

PACKAGE = "model.mlpackage"
FUNCTIONS = ("main", "embed", "unembed")
SCHEMES = ("fp32", "fp16", "int8", "int4", "palettize4")
# additive mask for disallowed keys: finite in fp16 (a float32-min mask becomes -inf there and NaN in softmax) and
# exp(MASK_NEG + any logit) underflows to exactly 0 in both precisions
MASK_NEG = -1e4


class StateAttention(CachedAttention):
    """The KV cache as fp16 state buffers written by slice assignment at the positions `input_pos` (a slice).

    CoreML converts a slice assignment into a state update; an index_copy_ does not convert and an indexed assignment
    converts but never reaches the state. Attention reads the cache up to the slice's end."""

    split = False  # keep an fp16 low part next to each fp16 cache (the fp32 program)

    def __init__(self, cfg, layer: int = 0):
        super().__init__(cfg, layer)
        shape = self.k_cache.shape
        names = ("k_cache", "v_cache", "k_lo", "v_lo") if self.split else ("k_cache", "v_cache")
        for name in names:
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float16), persistent=False)

    def write_cache(self, input_pos: slice, k, v):
        return self._store("k", input_pos, k), self._store("v", input_pos, v)

    def _store(self, kind: str, pos: slice, x: torch.Tensor) -> torch.Tensor:
        hi = getattr(self, f"{kind}_cache")
        x_hi = x.to(torch.float16)
        hi[:, :, pos] = x_hi
        if not self.split:
            return hi[:, :, : pos.stop].to(x.dtype)
        lo = getattr(self, f"{kind}_lo")
        lo[:, :, pos] = (x - x_hi.to(x.dtype)).to(torch.float16)  # the rounding error of hi, itself to 11 bits
        return hi[:, :, : pos.stop].to(x.dtype) + lo[:, :, : pos.stop].to(x.dtype)


class SplitStateAttention(StateAttention):
    split = True


class CoreMLDecoder(Decoder):
    """forward(tokens [1, n], causal_mask [1, 1, n, end]) -> logits [1, n, V] at positions end - n .. end - 1."""

    def __init__(self, fw: FoldedWeights, fp32: bool):
        super().__init__(fw, SplitStateAttention if fp32 else StateAttention)

    def forward(self, tokens: torch.Tensor, causal_mask: torch.Tensor, sliding_mask=None) -> torch.Tensor:
        """sliding_mask [1, 1, n, end]: the sliding layers' (an input only where the config has them)."""
        end = causal_mask.shape[-1]
        pos = slice(end - tokens.shape[1], end)
        return self.run(tokens, pos, {"full": causal_mask, "sliding": sliding_mask}, [pos] * len(self.layers))

    def state_names(self) -> list[str]:
        return [n for n, _ in self.named_buffers() if ".attention." in n]


def convert(dec: CoreMLDecoder, function: str, fp32: bool):
    """ct.convert of one function of FUNCTIONS (torch.jit.trace; flexible lengths as RangeDim)."""
    import coremltools as ct

    cfg = dec.cfg
    common = {
        "convert_to": "mlprogram",
        "minimum_deployment_target": ct.target.iOS18,
        "compute_precision": ct.precision.FLOAT32 if fp32 else ct.precision.FLOAT16,
        "skip_model_load": True,  # loading needs macOS; the package is checked by its session instead
    }
    n, end = ct.RangeDim(1, cfg.max_seq_len), ct.RangeDim(1, cfg.max_seq_len)
    rows = ct.RangeDim(1, cfg.vocab_size)
    if function == "main":
        tok2, mask2 = torch.zeros(1, 2, dtype=torch.int32), torch.from_numpy(causal_mask(1, 2, MASK_NEG))
        window = cfg.sliding_window if cfg.has_sliding else None
        masks = (mask2,) if window is None else (mask2, torch.from_numpy(causal_mask(1, 2, MASK_NEG, window)))
        with torch.no_grad():
            traced = torch.jit.trace(dec, (tok2, *masks))
        dec.reset_cache()  # tracing ran the cache writes eagerly
        states = [
            ct.StateType(ct.TensorType(shape=tuple(buf.shape), dtype=np.float16), name=name)
            for name, buf in dec.named_buffers()
            if name in dec.state_names()
        ]
        return ct.convert(
            traced,
            inputs=[
                ct.TensorType(name="tokens", shape=(1, n), dtype=np.int32),
                ct.TensorType(name="causal_mask", shape=(1, 1, n, end), dtype=np.float32),
                *[ct.TensorType(name="sliding_mask", shape=(1, 1, n, end), dtype=np.float32)] * (window is not None),
            ],
            outputs=[ct.TensorType(name="logits", dtype=np.float32)],
            states=states,
            **common,
        )
    if function == "embed":
        example, feed = torch.arange(3, dtype=torch.int32), ct.TensorType(name="tokens", shape=(rows,), dtype=np.int32)
        output = "embeddings"
    else:
        example, feed = torch.zeros(3, cfg.dim), ct.TensorType(name="hidden", shape=(rows, cfg.dim), dtype=np.float32)
        output = "logits"
    with torch.no_grad():
        traced = torch.jit.trace(EntryPoint(dec, function), (example,))
    return ct.convert(traced, inputs=[feed], outputs=[ct.TensorType(name=output, dtype=np.float32)], **common)


def compression_config(scheme: Scheme, model):
    """coremltools.optimize config for a scheme: linear/matmul/gather weights only, minus the d x d transforms."""
    from coremltools.optimize import coreml as cto

    if scheme.name == "int8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    elif scheme.name == "int4":
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=scheme.group_size
        )
    else:
        op = cto.OpPalettizerConfig(
            mode="kmeans",
            nbits=scheme.linear_bits,
            granularity="per_grouped_channel",
            group_size=scheme.group_size,
            num_kmeans_workers=1,
        )
    # const names come from the traced parameter names; compression reads them from the saved program (its spec)
    # the d x d transforms stay fp16, except under calibrated rounding (pit_export/calibrate.py), which rounds them on
    # the int8 grid, blocks of 32 (per output channel, W E - I reached 0.11 on pit-tiny; blocks: 0.03): the compact
    # layout then costs what a tied model does (docs/measurements.md)
    dxd = None
    if getattr(scheme, "calibration", None) and scheme.name == "int4":
        dxd = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_block", block_size=scheme.group_size
        )
    skip = {name: dxd for name in const_names(model.get_spec()) if "head_proj" in name or "embed_proj" in name}
    return cto.OptimizationConfig(op_type_configs={t: op for t in ("linear", "matmul", "gather")}, op_name_configs=skip)


def const_names(spec) -> list[str]:
    """The names of every const op of an ML program spec, as coremltools.optimize loads them (the op's "name"
    attribute, else its output's name)."""
    names = []

    def walk(block):
        for op in block.operations:
            if op.type == "const":
                attr = op.attributes["name"] if "name" in op.attributes else None  # [] on a map would insert
                names.append(attr.immediateValue.tensor.strings.values[0] if attr is not None else op.outputs[0].name)
            for inner in op.blocks:
                walk(inner)

    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            walk(block)
    return names


def compress(model, scheme: Scheme):
    from coremltools.optimize import coreml as cto

    cfg = compression_config(scheme, model)
    if scheme.name == "palettize4":
        return cto.palettize_weights(model, cfg)
    return cto.linear_quantize_weights(model, cfg)


def write_function(fw: FoldedWeights, function: str, scheme: Scheme, dest: Path) -> None:
    """One function, converted (and compressed) on its own and saved as a single-function package."""
    fp32 = scheme.name == "fp32"
    with quiet():
        model = convert(CoreMLDecoder(fw, fp32), function, fp32)
        if scheme.linear_bits is not None:
            model = compress(model, scheme)
        model.save(str(dest))


def _blob_values(msg):
    """Every MIL Value stored in weight.bin, anywhere under a proto message."""
    from coremltools.proto import MIL_pb2

    if isinstance(msg, MIL_pb2.Value) and msg.HasField("blobFileValue"):
        yield msg
        return
    for field, value in msg.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        if field.message_type.GetOptions().map_entry:
            value = value.values()
        for child in [value] if hasattr(value, "ListFields") else value:  # one message, or a repeated field / map
            if hasattr(child, "ListFields"):  # map values may be scalars
                yield from _blob_values(child)


def _read_blob(reader, value):
    """(kind, array) of one weight.bin value, through coremltools' blob storage reader."""
    from coremltools.proto import MIL_pb2

    kind = BLOB_KINDS[MIL_pb2.DataType.Name(value.type.tensorType.dataType)]
    return kind, getattr(reader, f"read_{kind}_data")(value.blobFileValue.offset)


def merge_functions(packages: dict[str, Path], dest: Path, default: str = "main") -> None:
    """One multifunction .mlpackage from single-function ones: what ct.utils.save_multifunction writes (the same
    functions, the same weight.bin with a blob shared wherever the bytes are equal), one blob at a time.
    save_multifunction instead loads every function's weights into a MIL program and exports it again: at 135M
    parameters that held the vocabulary table three times and peaked 1.1 GB above the process. Outside the
    coremltools versions its blob storage access was written for (compat.coremltools), save_multifunction it is."""
    import coremltools as ct
    from coremltools.proto import Model_pb2

    storage = blob_storage()
    if storage is None:
        desc = ct.utils.MultiFunctionDescriptor()
        for name, path in packages.items():
            desc.add_function(str(path), src_function_name="main", target_function_name=name)
        desc.default_function_name = default
        ct.utils.save_multifunction(desc, str(dest))
        return
    blob_reader, blob_writer = storage

    specs = {name: ct.utils.load_spec(str(path)) for name, path in packages.items()}
    merged = Model_pb2.Model()
    merged.CopyFrom(specs[default])
    merged.mlProgram.ClearField("functions")
    described = []
    with scratch_dir() as weights:
        writer = blob_writer(str(weights / "weight.bin"))
        stored: dict[bytes, int] = {}  # digest of (dtype, bytes) -> offset in the merged weight.bin
        for name, spec in specs.items():
            reader = blob_reader(str(next(packages[name].rglob("weight.bin"))))
            moved: dict[int, int] = {}  # offset in this package -> offset in the merged file
            for value in _blob_values(spec.mlProgram):
                old = value.blobFileValue.offset
                if old not in moved:
                    kind, data = _read_blob(reader, value)
                    digest = hashlib.sha256(kind.encode())
                    digest.update(np.ascontiguousarray(data))  # the array's buffer itself: no copy of a table
                    key = digest.digest()
                    if key not in stored:
                        stored[key] = getattr(writer, f"write_{kind}_data")(data)
                    moved[old] = stored[key]
                    del data
                value.blobFileValue.offset = moved[old]
            merged.mlProgram.functions[name].CopyFrom(spec.mlProgram.functions["main"])
            d = spec.description
            described.append(
                Model_pb2.FunctionDescription(
                    name=name,
                    input=d.input,
                    output=d.output,
                    state=d.state,
                    predictedFeatureName=d.predictedFeatureName,
                    predictedProbabilitiesName=d.predictedProbabilitiesName,
                )
            )
        del writer  # flushes weight.bin
        metadata = specs[default].description.metadata
        merged.description.CopyFrom(
            Model_pb2.ModelDescription(functions=described, defaultFunctionName=default, metadata=metadata)
        )
        # iOS 18 (specification 9) is the first to run multifunction models
        merged.specificationVersion = max(9, *(s.specificationVersion for s in specs.values()))
        ct.models.MLModel(merged, weights_dir=str(weights), skip_model_load=True).save(str(dest))


@contextlib.contextmanager
def quiet():
    """coremltools draws a progress bar per pass pipeline on stderr: hide them when its logging is silenced (the CLI
    does that unless --debug); warnings about renamed state buffers (dots become underscores) always."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if logging.getLogger("coremltools").getEffectiveLevel() < logging.ERROR:
            yield
        else:
            with contextlib.redirect_stderr(io.StringIO()):
                yield


def export(fw: FoldedWeights, scheme: Scheme, out: Path, ckpt, progress) -> dict:
    if scheme.embedding_bits is not None:
        raise BadInput("CoreML compresses the embedding table with the scheme itself: drop --embedding-bits")
    if scheme.name not in SCHEMES:
        raise BadInput(f"scheme {scheme.name!r} is not available for CoreML (choose from {', '.join(SCHEMES)})")
    fp32 = scheme.name == "fp32"
    states = [n.replace(".", "_") for n in CoreMLDecoder(fw, fp32).state_names()]  # as the converter names them
    # a large model converts each function in a forked child: a converted program holds a copy of its weights and
    # the converter's heap does not shrink back, so three conversions in one process would stack
    large = fw.nbytes > FORK_ABOVE_BYTES
    t0 = time.perf_counter()
    with scratch_dir() as tmp:
        packages = {name: tmp / f"{name}.mlpackage" for name in FUNCTIONS}
        for name in FUNCTIONS:
            progress(f"convert {name} ({'fp32' if fp32 else 'fp16'} compute{'' if fp32 else ', ' + scheme.name})")
            job = functools.partial(write_function, fw, name, scheme, packages[name])
            run_forked(job) if large else job()
        fw.release()  # the single-function packages hold the weights now
        release_memory()
        t1 = time.perf_counter()
        progress("save multifunction package")
        merge_functions(packages, Path(out) / PACKAGE)
    cfg = fw.cfg
    return {
        "deploy_files": sorted(p.relative_to(out).as_posix() for p in (Path(out) / PACKAGE).rglob("*") if p.is_file()),
        "coreml": {
            "package": PACKAGE,
            "functions": list(FUNCTIONS),
            "compute_precision": "fp32" if fp32 else "fp16",
            "activations": "fp32" if fp32 else "fp16",  # weight-only compression: int8 here is not dynamic int8
            "kv_cache": "fp16 hi + lo state pairs" if fp32 else "fp16 states",
            "states": states,
            "max_seq_len": cfg.max_seq_len,
            "vocab_size": cfg.vocab_size,
            "mask_neg": MASK_NEG,
            "sliding_window": cfg.sliding_window if cfg.has_sliding else None,  # main takes a sliding_mask too
            "minimum_deployment_target": "iOS18",
            "convert_seconds": round(t1 - t0, 2),  # compression included
            "save_seconds": round(time.perf_counter() - t1, 2),
        },
    }

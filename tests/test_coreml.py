"""iOS target: the saved CoreML package through the MIL numpy evaluator (Linux) or MLModel.predict (macOS), against
the training graph. One export per scheme; the CLI test exports the default (int4)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from pit_export.runtimes.coreml import CoreMLSession, MilNumpySession, on_macos
from pit_export.runtimes.milnumpy import MilError, load_program
from pit_export.runtimes.pytorch import ReferenceSession

from pit_export.errors import BadInput
from pit_export.export import export_artifact
from pit_export.fold import fold
from pit_export.validate import GATES, ValidateConfig, eval_windows, validate

from .conftest import DEFAULT_MODEL, ROOT

PACKAGE = "model.mlpackage"
WEIGHTS = f"{PACKAGE}/Data/com.apple.CoreML/weights/weight.bin"
SPEC = f"{PACKAGE}/Data/com.apple.CoreML/model.mlmodel"
FP32_GATE = GATES["fp32"]["max_abs_logit"][1]


def _export(ckpt, tmp_path_factory, scheme: str):
    out = tmp_path_factory.mktemp("coreml") / scheme
    export_artifact(ckpt, "ios", out, scheme=scheme, layout="shared-z")
    return out


@pytest.fixture(scope="module")
def fp32_dir(pit_ckpt, tmp_path_factory):
    return _export(pit_ckpt, tmp_path_factory, "fp32")


@pytest.fixture(scope="module")
def fp16_dir(pit_ckpt, tmp_path_factory):
    return _export(pit_ckpt, tmp_path_factory, "fp16")


@pytest.fixture(scope="module")
def ref(pit_ckpt):
    return ReferenceSession(pit_ckpt.model)


def op_types(folder) -> set[str]:
    return {t for f in load_program(folder / PACKAGE).values() for t in [*(op.type for op in f.ops), *f.expanded]}


def test_fp32_package_matches_training_graph(ref, heldout, fp32_dir):
    """fp32 gates through the saved program: max |dlogit| <= 1e-4, W_out E - I <= 1e-5, 64 greedy tokens equal."""
    sess = MilNumpySession(fp32_dir)
    res = validate(ref, sess, heldout, "fp32")
    print(json.dumps({k: res.metrics[k] for k in ("max_abs_logit", "interface_err_max", "greedy_agree")}))
    assert res.passed, res.failures()
    assert res.metrics["greedy_tokens"] == 64


def test_state_writes_reach_the_cache(fp32_dir, heldout):
    """Prefill writes every cache position it covers (and no other) into the states; decode then reads them: it
    matches a full prefill within the fp32 gate, and the same decode over zeroed states does not."""
    sess, toks, n = MilNumpySession(fp32_dir), heldout[0], 40
    sess.prefill(toks[:n], 0)
    assert sess.states and all(st.dtype == np.float16 for st in sess.states.values())
    for name, st in sess.states.items():
        assert np.abs(st[:, :, :n]).max(axis=(0, 1, 3)).all(), name  # every written position is non-zero
        assert not st[:, :, n:].any(), name
    # the low halves hold hi's rounding error: the fp32 cache is really kept to ~22 bits
    assert all(st.any() for name, st in sess.states.items() if name.endswith("_lo"))
    step = sess.decode(int(toks[n]), n)
    full = MilNumpySession(fp32_dir).prefill(toks[: n + 1], 0)[-1]
    np.testing.assert_allclose(step, full, atol=FP32_GATE, rtol=0)
    for st in sess.states.values():
        st[...] = 0
    assert np.abs(sess.decode(int(toks[n]), n) - full).max() > 100 * FP32_GATE


def test_fp16_package_top1_and_margin_bound(ref, heldout, fp16_dir):
    """fp16 gates (ppl ratio, top-1 >= 0.99). Top-1 can only flip at a position where the reference's top-2 margin
    is below twice that position's max |dlogit|: agreement is at least the share of positions with a wider margin."""
    sess = MilNumpySession(fp16_dir)
    res = validate(ref, sess, heldout, "fp16")
    m = res.metrics
    print(json.dumps({k: m[k] for k in ("max_abs_logit", "kl_mean", "kl_p99", "top1", "ppl_ratio")}))
    assert res.passed, res.failures()
    agree, safe = [], []
    for w in eval_windows(heldout, ValidateConfig(n_windows=2), ref.max_seq_len):
        ref.reset()
        r, a = ref.prefill(w, 0), sess.prefill(w, 0)
        top2 = np.sort(r, axis=-1)[:, -2:]
        safe.append(top2[:, 1] - top2[:, 0] > 2 * np.abs(r - a).max(-1))
        agree.append(r.argmax(-1) == a.argmax(-1))
    safe, agree = np.concatenate(safe), np.concatenate(agree)
    assert agree[safe].all() and agree.mean() >= safe.mean()


@pytest.mark.slow  # k-means over every 8-row group: ~3x the cost of an int4 export; benchmarks/artifacts.py reports it
def test_palettized_package_within_gate(pit_ckpt, ref, heldout, tmp_path_factory):
    out = _export(pit_ckpt, tmp_path_factory, "palettize4")
    assert "constexpr_lut_to_dense" in op_types(out)  # the evaluator expanded the lookup tables itself
    res = validate(ref, MilNumpySession(out), heldout, "palettize4", ValidateConfig(n_greedy=16))
    print(json.dumps({k: res.metrics[k] for k in ("kl_mean", "top1", "ppl_ratio", "interface_err_max")}))
    assert res.passed, res.failures()


@pytest.mark.parametrize("seed", range(3))
def test_constexpr_kernels_match_coremltools_definitions(seed):
    """The evaluator's weight decompression equals the ops' reference semantics in coremltools (iOS 18 opset):
    grouped lookup tables (palettization) and blockwise scale/offset (int4 / int8), on random shapes."""
    from coremltools.converters.mil.mil.ops.defs.iOS18 import compression as ops
    from pit_export.runtimes.milnumpy import KERNELS

    rng = np.random.default_rng(seed)
    rows, cols, groups, blocks = 8 * int(rng.integers(1, 5)), 32 * int(rng.integers(1, 4)), 2, 4
    idx = rng.integers(0, 16, (rows, cols)).astype(np.uint8)
    lut = rng.standard_normal((groups, 1, 16, 1)).astype(np.float16)
    want = ops.constexpr_lut_to_dense.decompress(idx, lut, None)
    np.testing.assert_array_equal(KERNELS["constexpr_lut_to_dense"](idx, lut), want)
    data = rng.integers(-8, 8, (rows, cols)).astype(np.int8)
    scale = rng.uniform(0.01, 1, (rows, cols // blocks)).astype(np.float16)
    offset = rng.integers(-2, 2, scale.shape).astype(np.int8)
    want = ops.constexpr_blockwise_shift_scale.decompress(data, scale, offset)
    got = KERNELS["constexpr_blockwise_shift_scale"](data, scale, offset)  # fp32; the reference rounds to fp16 once
    np.testing.assert_allclose(got, want, rtol=np.finfo(np.float16).eps / 2, atol=0)


def test_corrupted_weight_fails_parity(ref, heldout, fp32_dir, tmp_path):
    """One float of the shared table changed in weight.bin: the evaluator reads the package's bytes, so parity fails."""
    bad = tmp_path / "bad"
    shutil.copytree(fp32_dir, bad)
    blob = bytearray((bad / WEIGHTS).read_bytes())
    # blobs start with a 64-byte header (sentinel 0xDEADBEEF, dtype, size, data offset); take the largest, the table
    heads = [i for i in range(0, len(blob), 64) if blob[i : i + 4] == (0xDEADBEEF).to_bytes(4, "little")]
    size, start = max((int.from_bytes(blob[i + 8 : i + 16], "little"), i) for i in heads)
    at = int.from_bytes(blob[start + 16 : start + 24], "little") + size // 2
    blob[at : at + 4] = (np.frombuffer(blob[at : at + 4], np.float32) + 1).tobytes()
    (bad / WEIGHTS).write_bytes(bytes(blob))
    res = validate(ref, MilNumpySession(bad), heldout, "fp32", ValidateConfig(n_windows=1, n_greedy=4))
    assert "max_abs_logit" in {g.metric for g in res.failures()}


def test_unknown_op_fails_loudly(fp32_dir, tmp_path):
    from coremltools.proto import Model_pb2

    bad = tmp_path / "bad"
    shutil.copytree(fp32_dir, bad)
    spec = Model_pb2.Model()
    spec.ParseFromString((bad / SPEC).read_bytes())
    ops = spec.mlProgram.functions["main"].block_specializations["CoreML8"].operations
    next(op for op in ops if op.type == "silu").type = "silu_approximate"
    (bad / SPEC).write_bytes(spec.SerializeToString())
    with pytest.raises(MilError, match="silu_approximate"):
        MilNumpySession(bad)


def test_shared_table_stored_once(fp32_dir, fp16_dir, pit_ckpt):
    """The gather and the head read one table const, and the three functions share it (the merge stores each
    distinct blob once): weight.bin holds the folded shared-z weights once, under half a table of overhead; fp16
    halves it."""
    params = sum(v.numel() for v in fold(pit_ckpt, "shared-z")[0].tensors.values())
    d, V = pit_ckpt.config.dim, pit_ckpt.config.vocab_size
    assert (fp32_dir / WEIGHTS).stat().st_size < 4 * (params + V * d / 2)
    assert (fp16_dir / WEIGHTS).stat().st_size < 2 * (params + V * d / 2)


def test_schemes_are_checked(pit_ckpt, tmp_path):
    with pytest.raises(BadInput, match="8da4w"):
        export_artifact(pit_ckpt, "ios", tmp_path / "a", scheme="8da4w")
    with pytest.raises(BadInput, match="palettize4"):
        export_artifact(pit_ckpt, "android", tmp_path / "b", scheme="palettize4")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_exports_default_ios_target(tmp_path, pit_ckpt):
    """`pit-export export --target ios` (int4 blockwise, shared-z) validates through the evaluator before writing.
    The compressed table is one constexpr feeding the gather and the head: 4 bits + an fp16 scale per 32 weights
    (0.5625 bytes) for the folded weights, fp16 d x d transforms, and less than a second table's worth on top."""
    root = tmp_path / "out"
    cmd = [sys.executable, "-m", "pit_export", "export", str(DEFAULT_MODEL), "--target", "ios", "--out", str(root)]
    cmd += ["--n-windows", "8", "--n-greedy", "16"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr[-2000:]
    out = root / "ios"
    meta = json.loads((out / "pit_export.json").read_text())
    assert meta["backend"] == "coreml" and meta["scheme"] == "int4" and meta["validation"]["passed"]
    assert "not CoreML runtime" in meta["validation"]["session"] or on_macos()
    assert "constexpr_blockwise_shift_scale" in op_types(out)
    m = meta["validation"]["metrics"]
    print(json.dumps({k: m[k] for k in ("kl_mean", "kl_p99", "top1", "ppl_ratio", "interface_err_max")}))
    assert m["ppl_ratio"] <= GATES["int4"]["ppl_ratio"][1]
    params = sum(v.numel() for v in fold(pit_ckpt, "shared-z")[0].tensors.values())
    d, V = pit_ckpt.config.dim, pit_ckpt.config.vocab_size
    assert (out / WEIGHTS).stat().st_size < 0.5625 * params + 2 * 2 * d * d + 0.5625 * V * d / 2


@pytest.mark.skipif(not on_macos(), reason="MLModel.predict needs the CoreML runtime (macOS 15+); Linux runs the MIL")
def test_coreml_runtime_matches_training_graph(ref, heldout, fp32_dir, fp16_dir):
    for folder, scheme in ((fp32_dir, "fp32"), (fp16_dir, "fp16")):
        sess = CoreMLSession(folder)
        res = validate(ref, sess, heldout, scheme)
        assert res.passed, (scheme, res.failures())
        sess.close()


def _blob_bytes(package, spec) -> dict[str, list[bytes]]:
    """Each function's weight.bin values, in program order, as bytes."""
    from coremltools.libmilstoragepython import _BlobStorageReader

    from pit_export.export.coreml import _blob_values, _read_blob

    reader = _BlobStorageReader(str(package / "Data/com.apple.CoreML/weights/weight.bin"))
    return {
        name: [_read_blob(reader, v)[1].tobytes() for v in _blob_values(fn)]
        for name, fn in spec.mlProgram.functions.items()
    }


def _ops(fn) -> list[tuple]:
    """Op types with their inputs and outputs (coremltools renumbers some op names when it reloads a program),
    weights by position only: where a blob sits in weight.bin is the writer's choice (_blob_bytes compares them)."""
    from pit_export.export.coreml import _blob_values

    fn = type(fn).FromString(fn.SerializeToString())
    for v in _blob_values(fn):
        v.blobFileValue.offset = 0
    block = fn.block_specializations[fn.opset]
    return [(op.type, sorted((k, str(v)) for k, v in op.inputs.items()), str(op.outputs)) for op in block.operations]


def test_merge_writes_what_save_multifunction_writes(pit_ckpt, tmp_path):
    """The streaming merge against coremltools' own on int4 (compressed and float blobs): the same functions and
    descriptions, the same ops, the same bytes behind every weight, and weight.bin the same size (a blob shared
    across functions wherever save_multifunction shares one)."""
    import coremltools as ct

    from pit_export.export.coreml import FUNCTIONS, merge_functions, write_function
    from pit_export.quantize import get_scheme

    fw, _ = fold(pit_ckpt, "shared-z")
    packages = {name: tmp_path / f"{name}.mlpackage" for name in FUNCTIONS}
    for name in FUNCTIONS:
        write_function(fw, name, get_scheme("int4", None), packages[name])
    desc = ct.utils.MultiFunctionDescriptor()
    for name, path in packages.items():
        desc.add_function(str(path), src_function_name="main", target_function_name=name)
    desc.default_function_name = "main"
    ct.utils.save_multifunction(desc, str(tmp_path / "theirs.mlpackage"))
    merge_functions(packages, tmp_path / "ours.mlpackage")

    theirs, ours = (ct.utils.load_spec(str(tmp_path / f"{p}.mlpackage")) for p in ("theirs", "ours"))
    assert ours.specificationVersion == theirs.specificationVersion
    assert list(ours.description.functions) == list(theirs.description.functions)
    assert ours.description.defaultFunctionName == theirs.description.defaultFunctionName == "main"
    assert set(ours.mlProgram.functions) == set(theirs.mlProgram.functions) == set(FUNCTIONS)  # a map: no order
    for name in FUNCTIONS:
        assert _ops(ours.mlProgram.functions[name]) == _ops(theirs.mlProgram.functions[name])
    assert _blob_bytes(tmp_path / "ours.mlpackage", ours) == _blob_bytes(tmp_path / "theirs.mlpackage", theirs)
    size = lambda p: (tmp_path / p / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size  # noqa: E731
    assert size("ours.mlpackage") == size("theirs.mlpackage")


def test_large_models_convert_in_forked_children(pit_ckpt, fp32_dir, tmp_path, monkeypatch):
    """Above FORK_ABOVE_BYTES each function converts in a forked child; the package is the in-process one."""
    from pit_export.export import coreml as coreml_export

    forks = []
    real = coreml_export.run_forked
    monkeypatch.setattr(coreml_export, "run_forked", lambda fn: forks.append(fn) or real(fn))
    monkeypatch.setattr(coreml_export, "FORK_ABOVE_BYTES", 0)
    out = tmp_path / "forked"
    export_artifact(pit_ckpt, "ios", out, scheme="fp32", layout="shared-z")
    assert len(forks) == 3
    assert (out / WEIGHTS).read_bytes() == (fp32_dir / WEIGHTS).read_bytes()
    assert (out / SPEC).read_bytes() == (fp32_dir / SPEC).read_bytes()

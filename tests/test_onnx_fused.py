"""The fused onnx-cpu graph (pit_export/export/onnx_fused.py) against onnxruntime-genai's model builder, and the traced
graph it replaces for the configs it implements, which still serves every config the fused graph does not implement.

tests/test_onnx.py runs the parity suite on the default (fused) graph; these tests cover what is specific to it."""

import collections
import dataclasses
import hashlib
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from pit_export.models.pit import ModelConfig
from pit_export.runtimes import greedy_generate, open_session
from pit_export.runtimes.genai import genai_greedy
from pit_export.runtimes.pytorch import ReferenceSession

from pit_export.export import export_artifact
from pit_export.export import onnx as onnx_export
from pit_export.export.onnx_fused import fused_supports

og = pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory, pit_ckpt):
    out = tmp_path_factory.mktemp("fused") / "int4"
    export_artifact(pit_ckpt, "onnx-cpu", out, "int4", "shared-z")
    return out


def graph(path):
    return onnx.load(path / "model.onnx", load_external_data=False).graph


def test_fused_supports_only_plain_llama_fields(monkeypatch):
    """Every ModelConfig field outside the implemented set must hold its default; a field added to ModelConfig later
    (here a stand-in) makes a config unsupported as soon as it leaves its default."""
    from pit_export.export import onnx_fused

    assert fused_supports(ModelConfig())
    assert fused_supports(ModelConfig(dim=96, n_heads=3, n_kv_heads=1, tying="tied", max_seq_len=64))
    assert fused_supports(ModelConfig(qkv_bias=True, head_size=64, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert not fused_supports(ModelConfig(dim=96, n_heads=4, n_kv_heads=2))  # head size 24: GQA's CPU kernel wants 16k

    @dataclasses.dataclass
    class Later(ModelConfig):
        attention_bias: bool = False

    monkeypatch.setattr(onnx_fused, "ModelConfig", Later)
    assert onnx_fused.fused_supports(Later())
    assert not onnx_fused.fused_supports(Later(attention_bias=True))


def test_default_graph_is_fused(int4_dir, pit_ckpt):
    """One GroupQueryAttention per layer (RoPE inside, KV in place), SkipSimplifiedLayerNormalization carrying the
    residual, QKV and gate/up packed: 4 MatMulNBits per layer plus the head and the two d x d transforms."""
    cfg = pit_ckpt.config
    g = graph(int4_dir)
    ops = collections.Counter(n.op_type for n in g.node)
    L = cfg.n_layers
    assert ops["GroupQueryAttention"] == L
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * L and ops["SimplifiedLayerNormalization"] == 1
    assert ops["MatMulNBits"] == 4 * L + 3 and ops["GatherBlockQuantized"] == 1
    assert not {"Concat", "Transpose", "Pow", "ReduceMean", "Softmax"} & set(ops)
    gqa = next(n for n in g.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs["do_rotary"] == 1 and attrs["rotary_interleaved"] == 0
    assert {i.name for i in g.input} == {"input_ids", "attention_mask", "logits_from"} | {
        f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")
    }
    genai = json.loads((int4_dir / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True
    assert json.loads((int4_dir / "pit_export.json").read_text())["onnx"]["graph"] == "fused"
    # the RoPE tables are stored once, outside the graph proto, and read by every layer
    tables = [t for t in g.initializer if t.name in ("cos_cache", "sin_cache")]
    assert len(tables) == 2 and all(t.data_location == onnx.TensorProto.EXTERNAL for t in tables)
    assert all(t.name in ("cos_cache", "sin_cache") for t in tables)


@pytest.mark.parametrize(
    ("scheme", "layout"), [("8da4w", "shared-z"), ("int4", "shared-e"), ("int8", "untied"), ("int4+emb4", "untied")]
)
def test_quantized_as_written_is_the_quantizers_graph(scheme, layout, pit_ckpt, tmp_path):
    """The fused graph quantized weight by weight as it is written equals onnxruntime's MatMulNBitsQuantizer run over
    the whole fp32 fused graph (onnx.quantize, the upstream path): same nodes, same initializers bit for bit."""
    from pit_export.export import onnx_fused
    from pit_export.fold import fold
    from pit_export.quantize import get_scheme

    prec = onnx_export.precision(get_scheme(scheme), layout)
    graphs = {}
    for name, p in (("fp32", onnx_fused.Precision()), ("written", prec)):
        (tmp_path / name).mkdir()
        fw, _ = fold(pit_ckpt, layout)
        onnx_fused.write(fw, onnx_export.FUSED_NAMES, tmp_path / name / "model.onnx", "model.onnx.data", p)
        graphs[name] = onnx.load(tmp_path / name / "model.onnx")
    upstream = onnx_export.quantize(graphs["fp32"], prec, layout, tmp_path / "fp32")

    def nodes(g):
        return sorted(
            (n.op_type, n.name, tuple(n.input), tuple(n.output), tuple(sorted(map(str, n.attribute)))) for n in g.node
        )

    def inits(g):
        return {t.name: (t.data_type, tuple(t.dims), onnx.numpy_helper.to_array(t).tobytes()) for t in g.initializer}

    assert nodes(graphs["written"].graph) == nodes(upstream.graph)
    a, b = inits(graphs["written"].graph), inits(upstream.graph)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_fused_export_is_reproducible(int4_dir, pit_ckpt, tmp_path):
    again = tmp_path / "again"
    export_artifact(pit_ckpt, "onnx-cpu", again, "int4", "shared-z")
    for f in ("model.onnx", "model.onnx.data", "embed.onnx", "unembed.onnx", "genai_config.json"):
        a, b = ((d / f).read_bytes() for d in (int4_dir, again))
        assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest(), f


def test_shared_buffer_grows_and_rewinds(int4_dir, heldout):
    """Our session binds each layer's past and present to one buffer (genai's past_present_share_buffer); the buffer
    grows with the context used, and prefill at start_pos rewinds into it."""
    s = open_session(int4_dir)
    assert s.inner.shared_buffer
    w = np.asarray(heldout[0, :200], dtype=np.int64)
    full = s.prefill(w, 0)
    s.reset()
    parts = [s.prefill(w[:10], 0)]
    capacity = s.inner.buffers[0].shape()[2]
    parts += [s.decode(int(w[i]), i)[None] for i in range(10, 70)]
    parts.append(s.prefill(w[70:], 70))
    assert s.inner.buffers[0].shape()[2] > capacity
    np.testing.assert_allclose(np.concatenate(parts), full, atol=1e-3 * np.abs(full).max())
    np.testing.assert_allclose(s.prefill(w[150:], 150), full[150:], atol=1e-3 * np.abs(full).max())


def test_decode_writes_the_kv_in_place(int4_dir, heldout):
    """A decode step (and a last-position prefill) runs through the one IOBinding: the KV buffers it wrote are the
    ones it read, as in onnxruntime-genai. Only an all-rows prefill (logits_from fed 0, which IOBinding cannot bind)
    returns new buffers: were decode to take that path, every step would copy the whole cache."""
    s = open_session(int4_dir)
    w = np.asarray(heldout[0, :40], dtype=np.int64)
    s.prefill(w[:30], 0, last_only=True)
    held = list(s.inner.buffers)
    s.decode(int(w[30]), 30)
    s.prefill(w[31:33], 31, last_only=True)
    assert all(a is b for a, b in zip(held, s.inner.buffers, strict=True))
    s.prefill(w[33:35], 33)  # every row: logits_from fed
    assert not any(a is b for a, b in zip(held, s.inner.buffers, strict=True))


def test_head_computes_the_rows_asked_for(int4_dir, heldout):
    """logits_from: unfed (onnxruntime-genai's case) the head runs on the last position only and the graph says so
    (logits [b, 1, V]: genai's pruned-head models); 0 gives every position, k the last k, with the same values."""
    import onnxruntime as ort

    out = next(o for o in graph(int4_dir).output if o.name == "logits")
    assert out.type.tensor_type.shape.dim[1].dim_value == 1
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(int4_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_overridable_initializers()] == ["logits_from"]
    w = np.asarray(heldout[0, :40], dtype=np.int64)[None]
    cfg = json.loads((int4_dir / "config.json").read_text())
    kv = np.zeros((1, cfg["n_kv_heads"], 64, cfg["dim"] // cfg["n_heads"]), np.float32)
    feeds = {"input_ids": w, "attention_mask": np.ones_like(w)}
    feeds |= {i.name: kv for i in sess.get_inputs() if i.name.startswith("past_key_values.")}

    def run(**keep):
        return sess.run(["logits"], feeds | {k: np.array([v], np.int64) for k, v in keep.items()})[0][0]

    full, last, three = run(logits_from=0), run(), run(logits_from=-3)
    assert full.shape[0] == 40 and last.shape[0] == 1 and three.shape[0] == 3
    # the same rows through the same kernels; MatMulNBits' int8 activation blocks are per row, so M does not enter
    tol = 1e-5 * np.abs(full).max()
    np.testing.assert_allclose(last, full[-1:], atol=tol)
    np.testing.assert_allclose(three, full[-3:], atol=tol)
    # our Session asks for every row unless told otherwise
    s = open_session(int4_dir)
    np.testing.assert_allclose(s.prefill(w[0], 0), full, atol=tol)
    s.reset()
    np.testing.assert_allclose(s.prefill(w[0], 0, last_only=True), full[-1:], atol=tol)


def _builder_export(tmp_path, cfg: ModelConfig, tokenizer):
    from tests.hf_models import save_hf

    hf, out = tmp_path / "hf", tmp_path / "genai"
    save_hf(hf, dataclasses.replace(cfg, tying="tied"), tokenizer)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", out, "-p", "int4", "-e", "cpu"]
    subprocess.run([*map(str, cmd), "-c", str(tmp_path / "cache")], check=True, capture_output=True)
    return out


def test_graph_is_smaller_than_the_builders(int4_dir, pit_ckpt, tmp_path):
    """Beside onnxruntime-genai's builder on a tied Llama of the same shape at the same scheme (int4, block 32): no more
    nodes, a graph proto no larger, and weights larger only by what PIT and our rounding add: the two d x d transforms
    and the zero points of asymmetric blocks (the builder rounds symmetrically: ppl x1.05 on the default model, over
    the 4-bit gate)."""
    builder = _builder_export(tmp_path, pit_ckpt.config, pit_ckpt.path / "tokenizer.json")
    ours, theirs = graph(int4_dir), graph(builder)
    assert len(ours.node) <= len(theirs.node), (len(ours.node), len(theirs.node))
    assert (int4_dir / "model.onnx").stat().st_size <= (builder / "model.onnx").stat().st_size
    d = pit_ckpt.config.dim
    inits = {t.name: t for t in ours.initializer}
    extra = sum(int(np.prod(t.dims)) for n, t in inits.items() if n.endswith("_zero_points"))
    nbits = {n.input[0]: n for n in ours.node if n.op_type == "MatMulNBits"}
    for n in nbits.values():
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if attrs["N"] == attrs["K"] == d and n.input[0] in ("final_hidden", "table_rows"):  # the d x d transforms
            extra += sum(int(np.prod(inits[x].dims)) * (4 if "scales" in x else 1) for x in n.input[1:] if x)
    data = (int4_dir / "model.onnx.data").stat().st_size
    assert data - extra <= (builder / "model.onnx.data").stat().st_size, (data, extra)


def test_traced_graph_still_serves_other_configs(tmp_path, pit_ckpt, heldout, monkeypatch):
    """A config the fused graph does not implement gets the traced graph (present = concat(past, new)); our session
    reads which from the folder, and genai runs it with its own buffer mode."""
    monkeypatch.setattr(onnx_export, "fused_supports", lambda cfg: False)
    out = tmp_path / "traced"
    export_artifact(pit_ckpt, "onnx-cpu", out, "fp32", "shared-z")
    assert json.loads((out / "pit_export.json").read_text())["onnx"]["graph"] == "traced"
    assert json.loads((out / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is False
    assert "GroupQueryAttention" not in {n.op_type for n in graph(out).node}
    s = open_session(out)
    assert not s.inner.shared_buffer
    w = np.asarray(heldout[0, :64], dtype=np.int64)
    ref = ReferenceSession(pit_ckpt.model).prefill(w, 0)
    assert np.abs(s.prefill(w, 0) - ref).max() <= 1e-4  # the fp32 gate
    p = heldout[-1, :32].tolist()
    assert genai_greedy(out, p, 16) == greedy_generate(s, p, 16)

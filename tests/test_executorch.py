"""Android target through the real ExecuTorch runtime (XNNPACK): parity with the training graph, the KV cache
contract, quantization quality, the LLM runner's view of the artifact, and the CLI. One export per scheme."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from pit_export.runtimes import greedy_generate, open_session
from pit_export.runtimes.pytorch import ReferenceSession

from pit_export.fold import fold
from pit_export.validate import GATES, validate

from .conftest import DEFAULT_MODEL, ROOT


@pytest.fixture(scope="module")
def fp32_dir(et_fp32_dir):
    return et_fp32_dir


@pytest.fixture(scope="module")
def fp32_session(fp32_dir):
    s = open_session(fp32_dir)
    yield s
    s.close()


def test_fp32_matches_training_graph(pit_ckpt, heldout, fp32_session):
    res = validate(ReferenceSession(pit_ckpt.model), fp32_session, heldout, "fp32")
    assert res.passed, res.failures()
    assert res.metrics["greedy_tokens"] == 64


def test_reset_needs_no_cache_clearing(fp32_dir, fp32_session, heldout):
    """Stale cache slots past the current position are masked to exact zero weight: a new sequence from position
    0 after a longer one gives bit-identical logits to a freshly loaded program."""
    fp32_session.reset()
    fp32_session.prefill(heldout[0, :200], 0)
    fp32_session.reset()
    reused = fp32_session.prefill(heldout[1, :50], 0)
    fresh = open_session(fp32_dir)
    assert np.array_equal(reused, fresh.prefill(heldout[1, :50], 0))
    fresh.close()


def test_probes_and_forward_take_turns(fp32_session, heldout):
    """One method group is resident at a time: the probes unload forward (and its cache), forward comes back for
    a prefill from position 0 with the same logits, and a prefill that does not follow the cache is refused."""
    from pit_export.errors import BadInput

    fp32_session.reset()
    before = fp32_session.prefill(heldout[1, :50], 0)
    fp32_session.unembed(fp32_session.embed(heldout[1, :4]))
    assert set(fp32_session.inner.methods) == {"embed", "unembed"}
    with pytest.raises((ValueError, BadInput), match="does not follow the cache"):
        fp32_session.prefill(heldout[1, 50:52], 50)
    assert np.array_equal(fp32_session.prefill(heldout[1, :50], 0), before)
    assert set(fp32_session.inner.methods) == {"forward"}


def test_prefill_bounds_cover_the_context(fp32_session, heldout):
    """The dynamic sequence dimension reaches max_seq_len (not max - 1) and decode continues a chunked prefill."""
    n = fp32_session.max_seq_len
    full = fp32_session.prefill(heldout[0, :n], 0)
    assert full.shape == (n, fp32_session.vocab_size)
    fp32_session.prefill(heldout[0, : n - 2], 0)
    tail = fp32_session.prefill(heldout[0, n - 2 : n - 1], n - 2)
    last = fp32_session.decode(int(heldout[0, n - 1]), n - 1)
    # same math, different matmul blocking for 1 row vs n rows: fp32 parity gate
    np.testing.assert_allclose(np.stack([tail[0], last]), full[-2:], atol=GATES["fp32"]["max_abs_logit"][1], rtol=0)


def test_runner_metadata(fp32_dir, pit_ckpt):
    from executorch.runtime import Runtime

    cfg = pit_ckpt.config
    prog = Runtime.get().load_program(fp32_dir / "model.pte", data_path=fp32_dir / "model.ptd")
    want = {"get_max_seq_len": cfg.max_seq_len, "get_vocab_size": cfg.vocab_size, "get_bos_id": cfg.bos_id}
    assert {"forward", "embed", "unembed", "get_eos_ids", "use_kv_cache", *want} <= set(prog.method_names)
    for name, value in want.items():
        assert prog.load_method(name).execute([]) == [value]


def test_executorch_llm_runner_generates_our_tokens(fp32_dir, fp32_session):
    """ExecuTorch's own C++ LLM runner (what the demo apps use) loads the .pte and decodes greedily like we do."""
    runner_mod = pytest.importorskip("executorch.extension.llm.runner")
    from tokenizers import Tokenizer

    folder = fp32_dir
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompt, n = "def read_file(path):", 24
    pieces: list[str] = []
    runner = runner_mod.TextLLMRunner(*(str(folder / f) for f in ("model.pte", "tokenizer.json", "model.ptd")))
    runner.generate(prompt, runner_mod.GenerationConfig(max_new_tokens=n, temperature=0.0, echo=False), pieces.append)
    ours = greedy_generate(fp32_session, tok.encode(prompt).ids, n)
    assert "".join(pieces) == tok.decode(ours)


def test_cli_exports_default_target_within_8da4w_gate(tmp_path):
    """`pit-export export --target android` (preset: 8da4w + 4-bit embedding, untied) validates through the .pte
    before writing: exit 0 means the perplexity-ratio gate (<= 1.03) held on 8 held-out windows."""
    root = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "pit_export",
        "export",
        str(DEFAULT_MODEL),
        "--target",
        "android",
        "--out",
        str(root),
    ]
    cmd += ["--n-windows", "8", "--n-greedy", "16"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr[-2000:]
    out = root / "android"
    meta = json.loads((out / "pit_export.json").read_text())
    assert (out / "model.pte").is_file() and meta["backend"] == "executorch" and meta["scheme"] == "8da4w+emb4"
    m = meta["validation"]["metrics"]
    print(json.dumps({k: m[k] for k in ("kl_mean", "kl_p99", "top1", "ppl_ratio", "interface_err_max")}))
    assert meta["validation"]["passed"] and m["ppl_ratio"] <= GATES["8da4w"]["ppl_ratio"][1]
    assert m["kl_mean"] < 0.05 and m["top1"] > 0.8  # what a 4-bit model should keep (llama.cpp's Q4 range)


def _weight_bytes_read(ep) -> list[int]:
    """Bytes of each weight (parameter or lifted constant) an exported method's graph reads, each storage once."""
    sig = ep.graph_signature
    source = {**sig.inputs_to_parameters, **sig.inputs_to_lifted_tensor_constants}
    read = {}
    for n in ep.graph.nodes:
        if n.op == "placeholder" and n.name in source and n.users:
            t = ep.state_dict.get(source[n.name], ep.constants.get(source[n.name]))
            read[t.untyped_storage().data_ptr()] = t.nbytes
    return list(read.values())


def test_low_memory_lowering_writes_the_same_program(fp32_dir, pit_ckpt, tmp_path, monkeypatch):
    """Lowering inside lean_lowering (what the export does above LEAN_ABOVE_BYTES: partition copies share the
    constant tensors, XNNPACK's weight blobs wait on disk) changes where bytes wait, not what is written. While the
    program is lowered the spill folder really holds the weights: one blob per method for every weight of
    SPILL_BYTES or more it reads (the named-data store deduplicates only when writing). The program it writes equals
    the fixture's (ExecuTorch's own path at this size) byte for byte, and no spill folder is left in the artifact."""
    from pit_export.models.checkpoint import MARKER

    from pit_export.export import executorch as et
    from pit_export.export.lean_lowering import SPILL_BYTES, wants_lean

    fw = fold(pit_ckpt, "shared-z")[0]
    assert not wants_lean(fw.nbytes)  # the fixture was lowered ExecuTorch's own way: the reference bytes
    programs = et.export_programs(et.EtDecoder(fw))
    eligible = sum(b for ep in programs.values() for b in _weight_bytes_read(ep) if b >= SPILL_BYTES)
    assert eligible > 5 * fw.cfg.n_layers * SPILL_BYTES  # wq, wo and the MLP weights of every layer, the table

    out, waiting, lower = tmp_path / "lean", [], et.lower
    out.mkdir()

    def lower_then_look(*args):  # the lowered program holds its blobs; the spill folder is inside the artifact
        program = lower(*args)
        (spill,) = [p for p in out.iterdir() if p.name.startswith(".")]
        waiting.extend(p.stat().st_size for p in spill.iterdir())
        return program

    monkeypatch.setattr(et, "lower", lower_then_look)
    et.lower_and_write(programs, et.metadata(fw.cfg), True, out, lean=True)
    assert sum(waiting) == eligible and min(waiting) >= SPILL_BYTES, (len(waiting), sum(waiting), eligible)
    for name in ("model.pte", "model.ptd"):
        assert (out / name).read_bytes() == (fp32_dir / name).read_bytes(), name
    for folder in (out, fp32_dir):
        assert not [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != MARKER], folder


def test_shared_table_is_stored_once(fp32_dir, pit_ckpt):
    """Gather and head read one table: with the weights in model.ptd (content-deduplicated named data) the artifact
    is the size of the folded shared-z weights, one V x d table, plus a small overhead; embed/unembed add nothing."""
    params = sum(v.numel() for v in fold(pit_ckpt, "shared-z")[0].tensors.values())
    size = sum((fp32_dir / f).stat().st_size for f in ("model.pte", "model.ptd"))
    d, V = pit_ckpt.config.dim, pit_ckpt.config.vocab_size
    assert size < 4 * (params + V * d / 2)  # a second table copy would add 4 V d bytes

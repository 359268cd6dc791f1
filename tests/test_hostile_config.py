"""Hostile and corrupted configs: a config.json that disagrees with its weights, or asks for absurd sizes, fails in
milliseconds with exit 2 and one line naming the key, its value and what the weights say, before any model, RoPE
table, cache or runtime is built from it.

Each case runs through the real entry point (main(), in-process) for every command that reads a config. Asserted from
the process itself: wall time (a bound on runaway, not a speed test) and the peak resident memory above the resident
memory before the call (Linux resets the peak through /proc/self/clear_refs), plus nothing written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from pit_export.models.checkpoint import CACHE_COPIES, available_memory

from pit_export.errors import EXIT_BAD_INPUT

from .conftest import DEFAULT_MODEL
from .test_faults import cli

CONFIG = json.loads((DEFAULT_MODEL / "config.json").read_text())
TOKENIZER = DEFAULT_MODEL / "tokenizer.json"
TIME_BOUND_S = 5.0  # the bound for a refusal, import cost included in-process
MEMORY_BOUND_MB = 256  # a refusal may read headers and JSON; a model, table or cache of the hostile size would not fit
HUGE = "x" * 400_000  # a long string, inside the config size limit


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    raise KeyError(field)


class Runaway(Exception):
    pass


def measured(capsys, argv) -> tuple[int, str, float, int]:
    """(exit code, stderr, seconds, peak MiB above the resident set before the call)."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status("VmRSS")

    def runaway(signum, frame):
        raise Runaway("still running after 60 s")

    old = signal.signal(signal.SIGALRM, runaway)
    signal.alarm(60)  # a regression fails this test instead of hanging the suite
    try:
        t0 = time.monotonic()
        code, err = cli(capsys, argv)
        dt = time.monotonic() - t0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, err, dt, _status("VmHWM") - before


def files(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def assert_refused(capsys, argv, root: Path, says=()):
    cli(capsys, argv)  # once untimed: the command's module imports are a fixed cost, not the config's
    before = files(root)
    code, err, dt, peak = measured(capsys, argv)
    lines = err.strip().splitlines()
    assert code == EXIT_BAD_INPUT, err
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    assert "internal error" not in lines[0] and len(lines[0]) < 400, lines[0]
    for s in says:
        assert s in lines[0], lines[0]
    assert dt <= TIME_BOUND_S, f"{dt:.1f} s"
    assert peak <= MEMORY_BOUND_MB, f"peak +{peak} MiB"
    assert files(root) == before, "something was written"
    return lines[0]


# ---------------------------------------------------------------- PIT checkpoints


def pit_ckpt(root: Path, cfg: dict | str, src: Path = DEFAULT_MODEL) -> Path:
    """The default model with its config replaced (weights and tokenizer hard-linked: nothing copied)."""
    ck = root / "ck"
    ck.mkdir(parents=True)
    (ck / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    for f in ("model.safetensors", "tokenizer.json"):
        os.link(src / f, ck / f)
    return ck


# (name, config edits, fragments the line must contain: the key, the value, what the weights say)
PIT_CASES = [
    ("n_layers 1e8", {"n_layers": 100_000_000}, ["n_layers=100000000", "4 layers"]),
    ("n_layers 10**30", {"n_layers": 10**30}, ["n_layers", "4 layers"]),
    ("n_layers 5", {"n_layers": 5}, ["n_layers=5", "4 layers"]),
    ("n_layers 0", {"n_layers": 0}, ["n_layers", "positive"]),
    ("n_layers -1", {"n_layers": -1}, ["n_layers", "positive"]),
    ("n_layers string", {"n_layers": "4"}, ["n_layers", "int"]),
    ("n_layers float", {"n_layers": 4.0}, ["n_layers", "int"]),
    ("n_layers bool", {"n_layers": True}, ["n_layers", "int"]),
    ("n_layers null", {"n_layers": None}, ["n_layers"]),
    ("n_layers object", {"n_layers": {"a": 1}}, ["n_layers"]),
    ("max_seq_len 1e9", {"max_seq_len": 1_000_000_000}, ["max_seq_len=1000000000", "1,048,576"]),
    ("max_seq_len 10**30", {"max_seq_len": 10**30}, ["max_seq_len"]),
    ("max_seq_len 0", {"max_seq_len": 0}, ["max_seq_len", "positive"]),
    ("max_seq_len -5", {"max_seq_len": -5}, ["max_seq_len"]),
    ("vocab 4000", {"vocab_size": 4000}, ["vocab_size=4000", "[4096, 192]"]),
    ("vocab 1e9", {"vocab_size": 10**9}, ["vocab_size=1000000000", "[4096, 192]"]),
    ("dim 1e6", {"dim": 1_000_002}, ["dim"]),
    ("dim 96", {"dim": 96}, ["dim=96", "[4096, 192]"]),
    ("n_heads 5", {"n_heads": 5}, ["n_heads=5"]),
    ("n_heads 1e6", {"n_heads": 10**6}, ["n_heads"]),
    ("n_heads 12", {"n_heads": 12}, ["n_kv_heads", "[64, 192]"]),
    ("n_kv_heads 4", {"n_kv_heads": 4}, ["n_kv_heads"]),
    ("n_kv_heads 3", {"n_kv_heads": 3, "n_heads": 6}, ["n_kv_heads=3", "[64, 192]"]),
    ("n_kv_heads 0", {"n_kv_heads": 0}, ["n_kv_heads"]),
    ("ffn 1e9", {"ffn_dim": 10**9}, ["ffn_dim=1000000000", "[512, 192]"]),
    ("ffn 511", {"ffn_dim": 511}, ["ffn_dim=511", "[512, 192]"]),
    ("rope_theta -1", {"rope_theta": -1.0}, ["rope_theta"]),
    ("rope_theta NaN", '{"rope_theta": NaN}', ["rope_theta"]),
    ("rope_theta inf", '{"rope_theta": 1e400}', ["rope_theta"]),
    ("rope_theta string", {"rope_theta": "1e4"}, ["rope_theta"]),
    ("norm_eps negative", {"norm_eps": -1e-5}, ["norm_eps"]),
    ("tying huge string", {"tying": HUGE}, ["tying", "chars"]),
    ("tying number", {"tying": 5}, ["tying"]),
    ("train_z string", {"train_z": "yes"}, ["train_z"]),
    ("eos 1e12", {"eos_id": 10**12}, ["eos_id"]),
    ("bos -1", {"bos_id": -1}, ["bos_id"]),
    ("unknown key", {"n_experts": 8}, ["n_experts"]),
    ("rope_scaling yarn", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["'yarn'"]),
    ("rope_scaling llama3 partial", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["rope_scaling"]),
    ("hidden_act relu", {"hidden_act": "relu"}, ["hidden_act", "'relu'"]),
    ("head_size 0", {"head_size": 0}, ["head_size"]),
    ("head_size 1e9", {"head_size": 10**9}, ["head_size"]),
    ("sliding layers, no window", {"layer_types": ["sliding"] * 4}, ["sliding_window"]),
    ("layer_types wrong length", {"layer_types": ["full"] * 3, "sliding_window": 8}, ["layer_types", "4"]),
    ("nope_layers out of range", {"nope_layers": [7]}, ["nope_layers"]),
    ("final_softcap negative", {"final_softcap": -1.0}, ["final_softcap"]),
    ("qkv_bias string", {"qkv_bias": "yes"}, ["qkv_bias"]),
    ("qkv_bias without tensors", {"qkv_bias": True}, [".bias missing"]),
    ("unknown huge key", {HUGE: 1}, ["unknown config key", "chars"]),
    ("missing rope_theta", {"rope_theta": ...}, ["rope_theta", "missing"]),
    ("missing n_layers", {"n_layers": ...}, ["n_layers", "missing"]),
    ("missing dim", {"dim": ...}, ["dim", "missing"]),
    ("a list", "[4, 192]", ["JSON object"]),
    ("not json", '{"dim": 192,', ["not JSON"]),
    ("2 MB file", json.dumps({**CONFIG, "pad": " " * (2 << 20)}), ["bytes, beyond"]),
    ("empty object", "{}", ["missing"]),
]


def pit_config(edit) -> dict | str:
    if isinstance(edit, str):
        if edit.startswith("{") and "NaN" in edit or "1e400" in edit:
            key, value = edit.strip("{}").split(": ")
            return json.dumps({k: v for k, v in CONFIG.items() if k != json.loads(key)})[:-1] + f", {edit[1:]}"
        return edit
    cfg = {k: v for k, v in CONFIG.items() if edit.get(k, 0) is not ...}
    return cfg | {k: v for k, v in edit.items() if v is not ...}


@pytest.mark.parametrize("name, edit, says", PIT_CASES, ids=[c[0] for c in PIT_CASES])
def test_inspect_refuses_hostile_config(name, edit, says, tmp_path, capsys):
    ck = pit_ckpt(tmp_path, pit_config(edit))
    assert_refused(capsys, ["inspect", ck], tmp_path, says)


# the runaway cases of the issue, through every command that reads a checkpoint or an artifact
COMMANDS = {
    "validate": lambda ck, out: ["validate", ck, "--n-windows", "1"],
    "export": lambda ck, out: ["export", ck, "--target", "all", "--out", out],
    "fold": lambda ck, out: ["fold", ck, "--out", out],
    "generate": lambda ck, out: ["generate", ck, "--max-new-tokens", "2"],
    "train --from": lambda ck, out: ["train", "--from", ck, "--teacher", DEFAULT_MODEL, "--out", out],
}
RUNAWAY = [c for c in PIT_CASES if c[0] in ("n_layers 1e8", "max_seq_len 1e9", "vocab 1e9", "ffn 1e9", "dim 1e6")]


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("name, edit, says", RUNAWAY, ids=[c[0] for c in RUNAWAY])
def test_every_command_refuses_hostile_config(command, name, edit, says, tmp_path, capsys):
    ck = pit_ckpt(tmp_path, pit_config(edit))
    assert_refused(capsys, COMMANDS[command](ck, tmp_path / "out"), tmp_path, says)


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    from pit_export.models.checkpoint import load_checkpoint

    from pit_export.fold import fold, save_folded

    ck = load_checkpoint(DEFAULT_MODEL)
    return save_folded(tmp_path_factory.mktemp("folded") / "art", *fold(ck, "shared-z"), ck)


@pytest.mark.parametrize("command", ["generate", "bench", "validate --artifact"])
@pytest.mark.parametrize("name, edit, says", RUNAWAY, ids=[c[0] for c in RUNAWAY])
def test_artifact_with_hostile_config(command, name, edit, says, folded, tmp_path, capsys):
    """An artifact's config.json is read before its runtime opens: the same refusals."""
    art = tmp_path / "art"
    art.mkdir()
    for f in folded.iterdir():
        os.link(f, art / f.name)
    (art / "config.json").unlink()
    (art / "config.json").write_text(json.dumps(pit_config(edit)))
    argv = {
        "generate": ["generate", art, "--max-new-tokens", "2"],
        "bench": ["bench", art, "--out", tmp_path / "b.json", "--repeats", "1"],
        "validate --artifact": ["validate", DEFAULT_MODEL, "--artifact", art, "--n-windows", "1"],
    }[command]
    assert_refused(capsys, argv, tmp_path)


def test_context_beyond_this_machine_is_refused_with_the_estimate(tmp_path, capsys):
    """A context within the bounds, with weights that agree, but whose caches this machine cannot hold: refused up
    front with the estimate (inspect, which builds no cache, still shows the model)."""
    from pit_export.models.checkpoint import save_checkpoint
    from pit_export.models.pit import ModelConfig, Transformer, cache_bytes
    from tokenizers import Tokenizer

    cfg = ModelConfig(vocab_size=4096, dim=64, n_layers=64, n_heads=8, n_kv_heads=8, ffn_dim=64, max_seq_len=64)
    need = CACHE_COPIES * cache_bytes(ModelConfig(**{**cfg.__dict__, "max_seq_len": 1 << 20}))
    if need <= available_memory():
        pytest.skip(f"this machine holds {need / 2**30:.0f} GiB of caches")
    save_checkpoint(tmp_path / "src", Transformer(cfg), Tokenizer.from_file(str(TOKENIZER)))
    ck = pit_ckpt(
        tmp_path,
        {**json.loads((tmp_path / "src" / "config.json").read_text()), "max_seq_len": 1 << 20},
        tmp_path / "src",
    )
    line = assert_refused(capsys, ["validate", ck, "--n-windows", "1"], tmp_path, ["max_seq_len=1,048,576", "GiB"])
    assert f"~{need / 2**30:.1f} GiB" in line
    assert_refused(capsys, ["export", ck, "--target", "onnx-cpu", "--out", tmp_path / "o"], tmp_path, ["GiB"])
    code, err = cli(capsys, ["inspect", ck, "--json"])  # inspect builds no cache: it shows the model
    assert code == 0, err


# ---------------------------------------------------------------- Hugging Face folders (import-hf, train --teacher)


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    from pit_export.models.pit import ModelConfig

    from .hf_models import save_hf

    d = tmp_path_factory.mktemp("hf") / "llama"
    tiny = dict(vocab_size=4096, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)
    save_hf(d, ModelConfig(**tiny, tying="tied"), TOKENIZER, seed=3)
    return d


HF_CASES = [
    ("num_hidden_layers 1e8", {"num_hidden_layers": 100_000_000}, ["num_hidden_layers=100000000", "2 layers"]),
    ("num_hidden_layers 3", {"num_hidden_layers": 3}, ["num_hidden_layers=3", "2 layers"]),
    ("num_hidden_layers 0", {"num_hidden_layers": 0}, ["n_layers"]),
    ("num_hidden_layers string", {"num_hidden_layers": "2"}, ["num_hidden_layers", "integer"]),
    ("num_hidden_layers missing", {"num_hidden_layers": ...}, ["num_hidden_layers"]),
    ("hidden_size 1e6", {"hidden_size": 1_000_000}, ["hidden_size=1000000", "[4096, 64]"]),
    (
        "hidden_size 1e6, no head_dim",
        {"hidden_size": 1_000_000, "head_dim": ...},
        ["hidden_size=1000000", "[4096, 64]"],
    ),
    ("vocab_size 1e9", {"vocab_size": 10**9}, ["vocab_size=1000000000", "[4096, 64]"]),
    ("intermediate_size 1e9", {"intermediate_size": 10**9}, ["intermediate_size=1000000000", "[128, 64]"]),
    ("num_key_value_heads 4", {"num_key_value_heads": 4}, ["num_key_value_heads=4", "[32, 64]"]),
    ("num_attention_heads 1e6", {"num_attention_heads": 10**6}, ["q_proj", "[16000000, 64]"]),
    ("max_position_embeddings 1e12", {"max_position_embeddings": 10**12}, None),  # capped by --max-seq-len: valid
    ("rope_theta string", {"rope_theta": "abc"}, ["rope_theta"]),
    ("rope_scaling a list", {"rope_scaling": [1, 2]}, ["rope_scaling"]),
    ("architectures objects", {"architectures": [{"x": 1}]}, ["architectures"]),
    ("hidden_act huge", {"hidden_act": HUGE}, ["hidden_act", "chars"]),
    ("head_dim 1e9", {"head_dim": 10**9}, ["head_dim"]),
    ("bos list empty", {"bos_token_id": []}, ["bos_token_id"]),
    ("sliding_window string", {"sliding_window": "4096"}, ["sliding_window"]),
    # what a family's config asks for and the graph does not implement: refused by the key's name
    ("rope yarn", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, ["'yarn'"]),
    ("rope dynamic (v4)", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, ["'dynamic'"]),
    ("rope llama3 incomplete", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, ["low_freq_factor"]),
    (
        "rope linear + attention_factor",
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "attention_factor": 0.5}},
        ["attention_factor"],
    ),
    ("partial_rotary_factor", {"partial_rotary_factor": 0.5}, ["partial_rotary_factor"]),
    ("layer_types chunked", {"layer_types": ["chunked_attention", "full_attention"]}, ["chunked_attention"]),
    ("layer_types no window", {"layer_types": ["sliding_attention"] * 2, "sliding_window": None}, ["sliding_window"]),
    ("bidirectional", {"use_bidirectional_attention": True}, ["use_bidirectional_attention"]),
    ("experts", {"num_local_experts": 8}, ["num_local_experts"]),
    ("hidden_act gelu", {"hidden_act": "gelu"}, ["hidden_act", "'gelu'"]),
    ("architecture Gemma2", {"architectures": ["Gemma2ForCausalLM"]}, ["Gemma2ForCausalLM"]),
]


def hf_with(src: Path, root: Path, edit: dict) -> Path:
    d = root / "hf"
    d.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json":
            os.link(f, d / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if edit.get(k, 0) is not ...} | {k: v for k, v in edit.items() if v is not ...}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("name, edit, says", [c for c in HF_CASES if c[2]], ids=[c[0] for c in HF_CASES if c[2]])
@pytest.mark.parametrize("command", ["import-hf", "train --teacher"])
def test_hf_config_refused(command, name, edit, says, hf_src, tmp_path, capsys):
    d = hf_with(hf_src, tmp_path, edit)
    argv = {
        "import-hf": ["import-hf", d, "--out", tmp_path / "out"],
        "train --teacher": ["train", "--from", DEFAULT_MODEL, "--teacher", d, "--out", tmp_path / "out"],
    }[command]
    assert_refused(capsys, argv, tmp_path, says)


def test_hf_absurd_context_flag(hf_src, tmp_path, capsys):
    d = hf_with(hf_src, tmp_path, {"max_position_embeddings": 10**12})
    line = assert_refused(capsys, ["import-hf", d, "--out", tmp_path / "o", "--max-seq-len", str(10**9)], tmp_path)
    assert "max_seq_len" in line and math.isfinite(len(line))


def test_hf_index_naming_missing_and_huge_shards(hf_src, tmp_path, capsys):
    d = hf_with(hf_src, tmp_path, {})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-0001.safetensors"}}))
    assert_refused(capsys, ["import-hf", d, "--out", tmp_path / "o"], tmp_path, ["model-0001.safetensors"])
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model.safetensors"}, "p": HUGE * 200})
    )
    assert_refused(capsys, ["import-hf", d, "--out", tmp_path / "o"], tmp_path, ["bytes, beyond"])
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [1, 2]}))
    assert_refused(capsys, ["import-hf", d, "--out", tmp_path / "o"], tmp_path, ["weight_map"])
    shutil.rmtree(d)


# ---------------------------------------------------------------- the checks' own references


@pytest.mark.parametrize("tying", ["pit", "tied", "untied"])
@pytest.mark.parametrize("shape", [(4096, 192, 4, 6, 2, 512), (300, 64, 3, 8, 8, 96), (1000, 96, 1, 12, 3, 40)])
def test_expected_shapes_match_the_model(tying, shape):
    """The header check's spelled-out shapes are the training graph's own (built on the meta device)."""
    import torch
    from pit_export.models.pit import ModelConfig, Transformer, expected_shapes

    v, d, n, h, kv, f = shape
    cfg = ModelConfig(vocab_size=v, dim=d, n_layers=n, n_heads=h, n_kv_heads=kv, ffn_dim=f, tying=tying)
    with torch.device("meta"):
        m = Transformer(cfg)
    assert expected_shapes(cfg) == {k: tuple(t.shape) for k, t in m.state_for_checkpoint().items()}


def test_cache_estimate_covers_the_decoders_caches(pit_ckpt):
    """cache_bytes counts what the folded decoder (the graph every backend exports) allocates for its context."""
    from pit_export.models.pit import cache_bytes

    from pit_export.decoder import Decoder
    from pit_export.fold import fold

    dec = Decoder(fold(pit_ckpt, "shared-z")[0])
    held = sum(b.numel() * b.element_size() for n, b in dec.named_buffers() if "cache" in n or n.startswith("rope_"))
    assert held > 0 and held <= cache_bytes(pit_ckpt.config) <= 2 * held

"""ONNX Runtime session (CPU EP) over an onnx-cpu artifact: model.onnx with past/present KV, embed/unembed probes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .base import register

KEEP = "logits_from"  # pit_export.export.onnx_fused.KEEP (runtimes do not import the exporter)


def _session(path: Path, threads: int | None, profile_dir: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    # warnings off: a graph with logits_from declares logits [b, 1, V] (what onnxruntime-genai reads as a pruned
    # head) and ORT warns on each run that feeds 0 (every row); errors still raise
    so.log_severity_level = 3
    if profile_dir:  # ORT's per-node trace (chrome tracing JSON), read back by op_profile()
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(profile_dir) / "ort")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OrtSession:
    """prefill/decode feed the kept present k/v back as past, truncated to start_pos (positions >= start_pos are
    recomputed); batch 1. One graph is resident at a time: the embed/unembed probes open on first use and close the
    model's session, which prefill reopens (the KV cache lives here, in numpy, so a reopened session continues it);
    a validation thus never holds the model's weights and the probes' tables together."""

    def __init__(self, path, threads: int | None = None, model_file: str = "model.onnx", profile_dir=None):
        path = Path(path)
        meta = json.loads((path / "pit_export.json").read_text())
        cfg = json.loads((path / "config.json").read_text())
        self.scheme = meta.get("scheme", "fp32")
        self.name = f"onnxruntime {model_file} ({self.scheme}, {meta.get('layout', '?')})"
        self.vocab_size, self.hidden_size, self.max_seq_len = cfg["vocab_size"], cfg["dim"], cfg["max_seq_len"]
        self.kv_shape = (1, cfg["n_kv_heads"], 0, cfg.get("head_size") or cfg["dim"] // cfg["n_heads"])
        self.path, self.threads, self.model_file, self.profile_dir = path, threads, model_file, profile_dir
        self.model: ort.InferenceSession | None = None
        self._open_model()
        self._probes: dict[str, ort.InferenceSession] = {}  # embed/unembed, opened on first use: each holds the table
        for name in ("embed", "unembed"):
            if not (path / f"{name}.onnx").is_file():
                raise OSError(f"{name}.onnx is missing")
        self.past_names = [i.name for i in self.model.get_inputs() if i.name.startswith("past_key_values.")]
        self.out_names = [o.name for o in self.model.get_outputs()]
        # what the folder says of its KV interface: one past/present buffer per layer written in place (the fused
        # graph's GroupQueryAttention, past_present_share_buffer in genai_config.json), or present = concat(past, new)
        genai = path / "genai_config.json"
        search = json.loads(genai.read_text()).get("search", {}) if genai.is_file() else {}
        self.shared_buffer = bool(search.get("past_present_share_buffer", False))
        self.has_position_ids = "position_ids" in {i.name for i in self.model.get_inputs()}
        # logits_from (an overridable initializer): the head computes the last row only unless fed 0
        self.keeps = KEEP in {i.name for i in self.model.get_overridable_initializers()}
        self.reset()

    def reset(self):
        self.past = [np.zeros(self.kv_shape, np.float32) for _ in self.past_names]
        self.filled = 0  # positions held in the shared buffers
        self.buffers: list[ort.OrtValue] = []  # shared-buffer mode: [1, H_kv, capacity, hd] per past/present pair
        self._io: ort.IOBinding | None = None  # bound to self.model and self.buffers: dropped when either changes

    def prefill(self, tokens, start_pos, last_only=False):
        tokens = np.asarray(tokens, dtype=np.int64)
        n = len(tokens)
        held = self.filled if self.shared_buffer else self.past[0].shape[2]
        if start_pos > held or start_pos + n > self.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + n} do not follow the cache or exceed max_seq_len")
        feeds = {"input_ids": tokens[None], "attention_mask": np.ones((1, start_pos + n), np.int64)}
        if self.has_position_ids:
            feeds["position_ids"] = np.arange(start_pos, start_pos + n, dtype=np.int64)[None]
        if self.keeps and not last_only:
            feeds[KEEP] = np.zeros(1, np.int64)
        if self.shared_buffer:
            logits = self._run_in_place(feeds, start_pos + n)
        else:
            feeds |= {k: p[:, :, :start_pos] for k, p in zip(self.past_names, self.past, strict=True)}
            out, *self.past = self._open_model().run(self.out_names, feeds)
            logits = out[0]
        return logits[-1:] if last_only else logits

    def _run_in_place(self, feeds: dict, total: int) -> np.ndarray:
        """onnxruntime-genai's past_present_share_buffer: each layer's past and present are one buffer, bound as both
        input and output, written in place at positions total - n .. total - 1 (the mask's width says where). The
        buffers grow by doubling up to max_seq_len, so memory follows the context used, not the longest possible."""
        capacity = self.buffers[0].shape()[2] if self.buffers else 0
        if total > capacity:
            self._grow(min(self.max_seq_len, max(total, 2 * capacity, 64)))
        sess = self._open_model()
        if KEEP in feeds:
            # IOBinding does not take an overridable initializer: a plain run, whose present outputs are new buffers
            # of the same capacity holding past + new (GroupQueryAttention copies when the two are not one buffer)
            ins = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
            ins |= dict(zip(self.past_names, self.buffers, strict=True))
            presents = [name.replace("past_key_values", "present") for name in self.past_names]
            logits, *self.buffers = sess.run_with_ort_values([self.out_names[0], *presents], ins)
            self._io = None
            self.filled = total
            return logits.numpy()[0]
        io = self._binding(sess)
        for k, v in feeds.items():  # a name bound again replaces its earlier binding
            io.bind_cpu_input(k, v)
        # the logits land in an array of ours (one row: logits_from unfed; else every fed position): reading them back
        # through io.get_outputs() would wrap all ~2L outputs, 0.3 ms a step at 30 layers
        rows = 1 if self.keeps else feeds["input_ids"].shape[1]
        logits = np.empty((1, rows, self.vocab_size), np.float32)
        io.bind_output(self.out_names[0], "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        sess.run_with_iobinding(io)
        self.filled = total
        return logits[0]

    def _binding(self, sess: ort.InferenceSession) -> ort.IOBinding:
        """The IOBinding with every KV buffer bound as both past and present, made once per session and set of
        buffers (as onnxruntime-genai binds them once), so a decode step binds only its own inputs."""
        if self._io is None:
            io = sess.io_binding()
            for name, buf in zip(self.past_names, self.buffers, strict=True):
                io.bind_ortvalue_input(name, buf)
                io.bind_ortvalue_output(name.replace("past_key_values", "present"), buf)
            self._io = io
        return self._io

    def _grow(self, capacity: int) -> None:
        kv, hd = self.kv_shape[1], self.kv_shape[3]
        old = self.buffers
        new = np.zeros((1, kv, capacity, hd), np.float32)
        self.buffers, self._io = [], None
        for i in range(len(self.past_names)):
            if old:
                new[:, :, : self.filled] = old[i].numpy()[:, :, : self.filled]
            self.buffers.append(ort.OrtValue.ortvalue_from_numpy(new.copy()))

    def decode(self, token, pos):
        return self.prefill(np.array([token]), pos, last_only=True)[0]

    def _open_model(self) -> ort.InferenceSession:
        if self.model is None:
            self._probes, self._io = {}, None
            self.model = _session(self.path / self.model_file, self.threads, self.profile_dir)
        return self.model

    def _probe(self, name: str) -> ort.InferenceSession:
        if name not in self._probes:
            self.model, self._io = None, None
            try:
                self._probes[name] = _session(self.path / f"{name}.onnx", self.threads)
            except ort.capi.onnxruntime_pybind11_state.Fail as e:
                from pit_export.errors import BadInput

                raise BadInput(f"{self.path}: {name}.onnx does not load ({str(e).splitlines()[0][:200]})") from None
        return self._probes[name]

    def embed(self, tokens):
        return self._probe("embed").run(None, {"input_ids": np.asarray(tokens, dtype=np.int64)[None]})[0][0]

    def unembed(self, hidden):
        return self._probe("unembed").run(None, {"hidden": np.asarray(hidden, dtype=np.float32)[None]})[0][0]

    def op_profile(self, skip_runs: int = 1) -> dict[str, float]:
        """Microseconds per op type over the model runs after the first `skip_runs` (the prefill), from ORT's trace;
        ends profiling."""
        events = json.loads(Path(self.model.end_profiling()).read_text())
        runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[skip_runs:]
        out: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                if any(a <= e["ts"] <= b for a, b in runs):
                    op = e.get("args", {}).get("op_name", "?")
                    out[op] = out.get(op, 0.0) + e["dur"]
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def close(self):
        self.model, self._probes, self._io = None, {}, None


@register("onnx")
def open_onnx(path, threads: int | None = None, model_file: str = "model.onnx", profile_dir=None, **_):
    from pit_export.errors import BadInput

    try:
        return OrtSession(path, threads, model_file, profile_dir)
    except (OSError, KeyError, ValueError, ort.capi.onnxruntime_pybind11_state.Fail) as e:
        raise BadInput(f"{path}: not a loadable onnx artifact ({str(e).splitlines()[0][:200]})") from None

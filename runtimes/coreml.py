"""CoreML sessions over an ios artifact (model.mlpackage: functions main, embed, unembed; KV cache as state).

macOS: CoreMLSession runs the package through the CoreML runtime (MLModel.predict with an MLState).
Elsewhere: MilNumpySession runs the same saved program with the numpy MIL evaluator (milnumpy.py): the package's own
ops and weight.bin, not the PyTorch model, and not the CoreML runtime either (its name says so).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np

from pit_export.compat.coremltools import causal_mask, import_coremltools

from .base import register


class _PackageSession:
    """What both sessions share: metadata, argument checks, chunking of the probes. Subclasses provide _call."""

    runtime = ""

    def __init__(self, folder: Path):
        folder = Path(folder)
        meta = json.loads((folder / "pit_export.json").read_text())
        cm = meta["coreml"]
        self.package = folder / cm["package"]
        self.scheme, self.layout = meta["scheme"], meta["layout"]
        self.vocab_size, self.max_seq_len, self.mask_neg = cm["vocab_size"], cm["max_seq_len"], cm["mask_neg"]
        self.window = cm.get("sliding_window")  # None: main has no sliding_mask input
        self.hidden_size = json.loads((folder / "config.json").read_text())["dim"]
        self.name = f"{self.runtime} ({self.scheme}, {self.layout})"

    def prefill(self, tokens, start_pos, last_only=False):
        tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
        n = len(tokens)
        if n == 0 or start_pos < 0 or start_pos + n > self.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + n} outside 1..{self.max_seq_len}")
        feeds = {"tokens": tokens[None], "causal_mask": causal_mask(start_pos, n, self.mask_neg)}
        if self.window is not None:
            feeds["sliding_mask"] = causal_mask(start_pos, n, self.mask_neg, self.window)
        logits = self._call("main", feeds, "logits")[0]
        return logits[-1:] if last_only else logits

    def decode(self, token, pos):
        return self.prefill(np.array([token]), pos, last_only=True)[0]

    def _rows(self, fn: str, key: str, x: np.ndarray, out: str) -> np.ndarray:
        # the probes take 1..V rows per call (the exported flexible range): chunk larger requests
        return np.concatenate([self._call(fn, {key: c}, out) for c in np.array_split(x, -(-len(x) // self.vocab_size))])

    def embed(self, tokens):
        return self._rows("embed", "tokens", np.asarray(tokens, dtype=np.int32).reshape(-1), "embeddings")

    def unembed(self, hidden):
        h = np.asarray(hidden, dtype=np.float32).reshape(-1, self.hidden_size)
        return self._rows("unembed", "hidden", h, "logits")

    def close(self):
        pass


class MilNumpySession(_PackageSession):
    """The saved MIL program evaluated in numpy; the cache is the program's fp16 states, zero-initialised like
    CoreML's. reset() keeps them: every slot past the current position is masked (weight exp(MASK_NEG) = 0)."""

    runtime = "MIL numpy evaluator (Linux; not CoreML runtime)"

    def __init__(self, folder: Path):
        from .milnumpy import load_program

        super().__init__(folder)
        self.functions = load_program(self.package)
        main = self.functions["main"]
        self.states = {n: np.zeros(s, np.float16) for n, s in main.state_shapes.items()}

    def _call(self, fn, feeds, out):
        with np.errstate(over="ignore"):  # silu/exp of large negatives: overflow to inf gives the right 0
            return self.functions[fn].run(feeds, self.states)[out].astype(np.float32)

    def reset(self):
        pass


class CoreMLSession(_PackageSession):
    """MLModel.predict per function (macOS 15+ / iOS 18 runtime); the KV cache lives in one MLState."""

    runtime = "CoreML runtime (MLModel.predict)"

    def __init__(self, folder: Path, compute_units: str = "CPU_AND_GPU"):
        ct = import_coremltools()
        super().__init__(folder)
        units = getattr(ct.ComputeUnit, compute_units)
        self.models = {
            fn: ct.models.MLModel(str(self.package), compute_units=units, function_name=fn)
            for fn in ("main", "embed", "unembed")
        }
        self.reset()

    def _call(self, fn, feeds, out):
        state = self.state if fn == "main" else None
        return self.models[fn].predict(feeds, state=state)[out].astype(np.float32)

    def reset(self):
        self.state = self.models["main"].make_state()

    def close(self):
        self.models.clear()


def on_macos() -> bool:
    return platform.system() == "Darwin"


@register("coreml")
def open_coreml(path, evaluator: bool | None = None, **_):
    """The CoreML runtime on macOS, the MIL numpy evaluator elsewhere (or when evaluator=True)."""
    from pit_export.errors import BadInput

    use_evaluator = not on_macos() if evaluator is None else evaluator
    try:
        return MilNumpySession(Path(path)) if use_evaluator else CoreMLSession(Path(path))
    except (OSError, KeyError, ValueError) as e:
        raise BadInput(f"{path}: not a loadable coreml artifact ({str(e).splitlines()[0][:200]})") from None

"""ExecuTorch session: the .pte's own methods through the ExecuTorch runtime (XNNPACK delegate), numpy in and out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pit_export.memory import release_memory

from .base import quiet_native_stderr, register


class ExecuTorchSession:
    """forward keeps the KV cache as program state between calls. reset() needs no work: attention reads the cache
    only up to the current position (llama::custom_sdpa), so a new sequence from position 0 never reads stale entries
    (tests/test_executorch.py checks this against a fresh program).

    One group of methods is resident at a time, forward or the embed/unembed probes: each holds its own XNNPACK-packed
    weights (the head twice), so a validation switching to the probes reloads the program with only them, and
    prefill reloads forward, whose cache then starts empty (a prefill must start where the cache ends)."""

    def __init__(self, folder: Path, threads: int | None = None, profile_dir: str | None = None):
        from executorch.runtime import Runtime

        folder = Path(folder)
        meta = json.loads((folder / "pit_export.json").read_text())
        et = meta["executorch"]
        if et.get("needs_quantized_kernels"):
            import executorch.kernels.quantized  # noqa: F401  registers quantized_decomposed::embedding_*bit
        if et.get("needs_custom_ops"):  # llama::update_cache, llama::custom_sdpa (as export's load_custom_ops)
            import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
        data = folder / et["data"] if et.get("data") else None  # shared layouts keep weights in model.ptd
        self.pte, self.data, self.runtime = folder / et["program"], data, Runtime.get()
        if threads:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            with quiet_native_stderr():
                _unsafe_reset_threadpool(threads)
        self.program, self.methods, self.filled = None, {}, 0
        self.profile_dir, self._traced = profile_dir, None
        if profile_dir:  # forward through a module that records an ETDump (per-op times, XNNPACK ops included)
            from executorch.extension.pybindings.portable_lib import _load_for_executorch

            self._traced = _load_for_executorch(str(self.pte), str(data) if data else None, True)
        self._load("forward")
        md = et["metadata"]
        self.name = f"executorch xnnpack ({meta['scheme']}, {meta['layout']})"
        self.scheme, self.layout = meta["scheme"], meta["layout"]
        self.vocab_size = md["get_vocab_size"]
        # the context, and the tokens one forward call takes (fewer where sliding layers keep a ring buffer: the
        # window); a ring holds the last 2 x window positions, so a prefill rewinds at most `chunk` + 1 behind
        self.max_seq_len = md.get("get_max_context_len", md["get_max_seq_len"])
        self.chunk = md["get_max_seq_len"]
        self.hidden_size = json.loads((folder / "config.json").read_text())["dim"]
        self.max_rows = et.get("probe_rows", {"embed": self.vocab_size, "unembed": self.vocab_size})

    def _load(self, method: str) -> None:
        """Make the group holding `method` the resident one, releasing the other group's program first."""
        group = ("forward",) if method == "forward" else ("embed", "unembed")
        self.methods.clear()
        self.program = None
        release_memory()
        with quiet_native_stderr():
            self.program = self.runtime.load_program(self.pte, data_path=self.data)
            self.methods = {m: self.program.load_method(m) for m in group if not (m == "forward" and self._traced)}
        if self._traced and method == "forward":
            self.methods["forward"] = _TracedMethod(self._traced, "forward")
        self.filled = 0  # a reloaded program's cache is empty

    def _run(self, method: str, *inputs: torch.Tensor) -> np.ndarray:
        if method not in self.methods:
            self._load(method)
        return self.methods[method].execute(list(inputs))[0].numpy()

    def prefill(self, tokens, start_pos, last_only=False):
        tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        if not 0 <= start_pos <= start_pos + len(tokens) <= self.max_seq_len or len(tokens) == 0:
            raise ValueError(f"positions {start_pos}..{start_pos + len(tokens)} outside 1..{self.max_seq_len}")
        if "forward" not in self.methods:
            self._load("forward")
        if start_pos > self.filled:
            raise ValueError(f"prefill at {start_pos} does not follow the cache, filled up to {self.filled}")
        if self.chunk < self.max_seq_len and 0 < start_pos < self.filled - self.chunk - 1:
            raise ValueError(
                f"prefill at {start_pos}: the sliding layers' ring holds positions from "
                f"{self.filled - 2 * self.chunk} on (start at 0 or within {self.chunk + 1} of {self.filled})"
            )
        outs = []
        for i in range(0, len(tokens), self.chunk):  # as the LLM runner prefills a prompt longer than a call takes
            part = tokens[i : i + self.chunk]
            pos = torch.arange(start_pos + i, start_pos + i + len(part))
            outs.append(self._run("forward", part[None], pos)[0])
        self.filled = start_pos + len(tokens)
        return outs[-1][-1:] if last_only else np.concatenate(outs)

    def decode(self, token, pos):
        return self.prefill(np.array([token]), pos, last_only=True)[0]

    def _rows(self, method: str, x: torch.Tensor) -> np.ndarray:
        # the methods take 1..max_rows rows per call (export bounds): chunk larger requests
        return np.concatenate([self._run(method, c) for c in torch.split(x, self.max_rows[method])])

    def embed(self, tokens):
        return self._rows("embed", torch.as_tensor(np.asarray(tokens), dtype=torch.long).reshape(-1))

    def unembed(self, hidden):
        return self._rows(
            "unembed", torch.as_tensor(np.asarray(hidden, dtype=np.float32)).reshape(-1, self.hidden_size)
        )

    def op_profile(self, skip_runs: int = 1) -> dict[str, float]:
        """Microseconds per op over the forward runs after the first `skip_runs`, from the ETDump: leaf events only
        (portable kernels and XNNPACK operators; their wrappers OPERATOR_CALL/DELEGATE_CALL would count twice)."""
        import re

        from executorch.devtools import Inspector

        path = str(Path(self.profile_dir) / "forward.etdp")
        self._traced.write_etdump_result_to_file(path)
        out: dict[str, float] = {}
        for block in Inspector(etdump_path=path).event_blocks:
            for e in block.events if block.name == "Execute" else []:
                if e.perf_data is None or e.name in WRAPPERS:
                    continue
                name = re.sub(r" #\d+$", "", e.name).removeprefix("native_call_")
                out[name] = out.get(name, 0.0) + 1e3 * sum(e.perf_data.raw[skip_runs:])
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def reset(self):
        self.filled = 0

    def close(self):
        self.methods.clear()
        self.program = self._traced = None


WRAPPERS = {"Method::execute", "OPERATOR_CALL", "DELEGATE_CALL"}


class _TracedMethod:
    def __init__(self, module, name: str):
        self.module, self.name = module, name

    def execute(self, inputs):
        return self.module.run_method(self.name, tuple(inputs))


@register("executorch")
def open_executorch(path, threads: int | None = None, profile_dir: str | None = None, **_):
    return ExecuTorchSession(Path(path), threads, profile_dir)

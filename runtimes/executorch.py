"""ExecuTorch session: the .pte's own methods through the ExecuTorch runtime (XNNPACK delegate), numpy in and out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .base import register


class ExecuTorchSession:
    """forward keeps the KV cache as program state between calls. reset() needs no work: the Decoder masks every
    cache slot past the current position, so a new sequence from position 0 never reads stale entries
    (tests/test_executorch.py checks this against a fresh program)."""

    def __init__(self, folder: Path, threads: int | None = None):
        from executorch.runtime import Runtime

        folder = Path(folder)
        meta = json.loads((folder / "pit_export.json").read_text())
        et = meta["executorch"]
        if et.get("needs_quantized_kernels"):
            import executorch.kernels.quantized  # noqa: F401  registers quantized_decomposed::embedding_*bit
        if threads:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            _unsafe_reset_threadpool(threads)
        data = folder / et["data"] if et.get("data") else None  # shared layouts keep weights in model.ptd
        self.program = Runtime.get().load_program(folder / et["program"], data_path=data)
        self.methods = {m: self.program.load_method(m) for m in ("forward", "embed", "unembed")}
        md = et["metadata"]
        self.name = f"executorch xnnpack ({meta['scheme']}, {meta['layout']})"
        self.scheme, self.layout = meta["scheme"], meta["layout"]
        self.vocab_size, self.max_seq_len = md["get_vocab_size"], md["get_max_seq_len"]
        self.hidden_size = json.loads((folder / "config.json").read_text())["dim"]
        self.max_rows = et.get("probe_rows", {"embed": self.vocab_size, "unembed": self.vocab_size})

    def _run(self, method: str, *inputs: torch.Tensor) -> np.ndarray:
        return self.methods[method].execute(list(inputs))[0].numpy()

    def prefill(self, tokens, start_pos):
        tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        if not 0 <= start_pos <= start_pos + len(tokens) <= self.max_seq_len or len(tokens) == 0:
            raise ValueError(f"positions {start_pos}..{start_pos + len(tokens)} outside 1..{self.max_seq_len}")
        pos = torch.arange(start_pos, start_pos + len(tokens))
        return self._run("forward", tokens[None], pos)[0]

    def decode(self, token, pos):
        return self.prefill(np.array([token]), pos)[0]

    def _rows(self, method: str, x: torch.Tensor) -> np.ndarray:
        # the methods take 1..max_rows rows per call (export bounds): chunk larger requests
        return np.concatenate([self._run(method, c) for c in torch.split(x, self.max_rows[method])])

    def embed(self, tokens):
        return self._rows("embed", torch.as_tensor(np.asarray(tokens), dtype=torch.long).reshape(-1))

    def unembed(self, hidden):
        return self._rows(
            "unembed", torch.as_tensor(np.asarray(hidden, dtype=np.float32)).reshape(-1, self.hidden_size)
        )

    def reset(self):
        pass

    def close(self):
        self.methods.clear()
        self.program = None


@register("executorch")
def open_executorch(path, threads: int | None = None, **_):
    return ExecuTorchSession(Path(path), threads)

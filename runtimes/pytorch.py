"""PyTorch sessions: the training graph (the reference) and the folded inference graph."""

from __future__ import annotations

import tempfile

import numpy as np
import torch
from pit_export.models.pit import Transformer

from pit_export.decoder import Decoder, FoldedWeights

from .base import register


class ReferenceSession:
    """The PIT training graph: full-sequence fp32 forward with triangular solves, no KV cache.

    prefill/decode recompute the whole prefix, so the reference shares nothing with any inference path."""

    def __init__(self, model: Transformer, threads: int | None = None):
        self.model, self.name = model, f"reference ({model.cfg.tying})"
        c = model.cfg
        self.vocab_size, self.hidden_size, self.max_seq_len = c.vocab_size, c.dim, c.max_seq_len
        self.history: list[int] = []
        if threads:
            torch.set_num_threads(threads)

    @torch.no_grad()
    def prefill(self, tokens, start_pos, last_only=False):
        self.history = self.history[:start_pos] + [int(t) for t in tokens]
        logits = self.model(torch.tensor([self.history]))[0, start_pos:]
        return logits[-1:].numpy() if last_only else logits.numpy()

    def decode(self, token, pos):
        return self.prefill(np.array([token]), pos, last_only=True)[0]

    @torch.no_grad()
    def embed(self, tokens):
        return self.model.embed(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).numpy()

    @torch.no_grad()
    def unembed(self, hidden):
        return self.model.unembed(torch.as_tensor(np.asarray(hidden, dtype=np.float32))).numpy()

    def round_trip_fn(self):
        """The round-trip target head(embed(t)) in float64 from the training graph (z_t Z^T for PIT), as a function
        of tokens that yields (vocab slice, target columns) one vocab chunk at a time, and that a validation keeps
        after dropping the model: it holds the interface's small parameters, while its V-sized tables wait in a
        temporary file (fp32) and each step reads the rows it needs, so an artifact opened next never shares memory
        with a reference table."""
        from pit_export.fold import interface_model, interface_tables, vocab_chunks

        rows = RowFile(interface_tables(self.model))
        base = interface_model(self.model, slice(0, 0), torch.float32)  # all but the tables' rows
        chunks = vocab_chunks(self.vocab_size)  # (the closure must not hold self: it would keep the model)

        @torch.no_grad()
        def target(tokens):
            ids = np.asarray(tokens).reshape(-1)
            h = interface_model(base, tables=rows.read(ids)).embed(torch.arange(len(ids)))  # once per call
            for c in chunks:
                yield c, interface_model(base, tables=rows.read(c)).unembed(h).numpy()

        target.close = rows.close
        return target

    def interface_target(self) -> np.ndarray:
        from pit_export.fold import reference_interface

        return reference_interface(self.model).numpy()

    def reset(self):
        self.history = []

    def close(self):
        pass


class RowFile:
    """fp32 tables spilled to a temporary file, read back by rows (a slice or token ids) into fresh tensors."""

    def __init__(self, tables: dict[str, torch.Tensor]):
        self.file = tempfile.TemporaryFile(prefix="pit-tables-")
        self.layout: dict[str, tuple[int, tuple[int, ...]]] = {}  # name -> (offset in floats, shape)
        offset = 0
        for name, t in tables.items():
            for c in torch.split(t.detach(), 4096):  # chunks: never a second whole table in memory
                c.to(torch.float32).contiguous().numpy().tofile(self.file)
            self.layout[name] = (offset, tuple(t.shape))
            offset += t.numel()
        self.file.flush()

    def read(self, rows: slice | np.ndarray) -> dict[str, torch.Tensor]:
        out = {}
        mm = np.memmap(self.file, np.float32, "r")  # unmapped on return: only the copied rows stay resident
        for name, (offset, shape) in self.layout.items():
            table = mm[offset : offset + int(np.prod(shape))].reshape(shape)
            out[name] = torch.from_numpy(np.array(table[rows]))
        del mm
        return out

    def close(self) -> None:
        self.file.close()


class FoldedSession:
    """The folded inference graph in eager PyTorch: the model every backend exports, before export."""

    def __init__(self, fw: FoldedWeights | Decoder, threads: int | None = None):
        self.decoder = fw if isinstance(fw, Decoder) else Decoder(fw)
        c = self.decoder.cfg
        self.name = f"folded torch ({self.decoder.layout})"
        self.vocab_size, self.hidden_size, self.max_seq_len = c.vocab_size, c.dim, c.max_seq_len
        if threads:
            torch.set_num_threads(threads)

    @torch.no_grad()
    def prefill(self, tokens, start_pos, last_only=False):
        tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        pos = torch.arange(start_pos, start_pos + len(tokens))
        logits = self.decoder(tokens[None], pos)[0]
        return logits[-1:].numpy() if last_only else logits.numpy()

    def decode(self, token, pos):
        return self.prefill(np.array([token]), pos, last_only=True)[0]

    @torch.no_grad()
    def embed(self, tokens):
        return self.decoder.embed(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).numpy()

    @torch.no_grad()
    def unembed(self, hidden):
        return self.decoder.unembed(torch.as_tensor(np.asarray(hidden, dtype=np.float32))).numpy()

    def reset(self):
        self.decoder.reset_cache()

    def close(self):
        pass


@register("torch")
def open_folded(path, threads: int | None = None, **_):
    from pit_export.errors import BadInput
    from pit_export.fold import load_folded

    fw = load_folded(path)
    try:
        return FoldedSession(fw, threads)
    except (KeyError, RuntimeError) as e:
        raise BadInput(f"{path}: folded weights do not match the config ({str(e).splitlines()[0][:200]})") from None

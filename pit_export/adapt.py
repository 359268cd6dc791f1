"""Short adaptation of an imported PIT model towards its teacher: distillation, KL(teacher || PIT) on corpus windows.

By default only L trains (d^2 parameters: T is the one thing the import had to choose); --train-body adds the body.
Z stays the teacher's polar factor. KL on held-out text is reported before and after, as import-hf reports it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pit_export.errors import BadInput
from pit_export.hf_import import compare, heldout, read_config, read_tensors
from pit_export.models.checkpoint import load_checkpoint, save_checkpoint
from pit_export.models.pit import Transformer


@dataclass
class AdaptConfig:
    steps: int = 100
    lr: float = 3e-3
    batch_size: int = 8
    seq_len: int = 128
    train_body: bool = False
    n_windows: int = 4  # held-out windows for the before/after KL
    corpus_bytes: int = 2_000_000
    seed: int = 0


def teacher_of(ckpt_path: Path) -> Path:
    """The HF folder an imported checkpoint came from (its import_report.json)."""
    try:
        return Path(json.loads((Path(ckpt_path) / "import_report.json").read_text())["source"])
    except (OSError, KeyError, json.JSONDecodeError):
        raise BadInput(f"{ckpt_path}: no import_report.json naming the teacher; pass --teacher") from None


def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    lt, ls = F.log_softmax(teacher_logits, -1), F.log_softmax(student_logits, -1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


def adapt(
    ckpt_path: Path, out: Path, ac: AdaptConfig, teacher_dir: Path | None = None, progress=print, force: bool = False
) -> dict:
    from pit_export.models.corpus import build_corpus
    from pit_export.models.train import encode_docs

    c = load_checkpoint(ckpt_path)
    if c.config.tying != "pit":
        raise BadInput(f"{ckpt_path}: adaptation needs a PIT checkpoint (tying={c.config.tying})")
    teacher_dir = Path(teacher_dir or teacher_of(ckpt_path))
    tcfg = read_config(teacher_dir, c.config.max_seq_len)
    if (tcfg.vocab_size, tcfg.dim, tcfg.n_layers) != (c.config.vocab_size, c.config.dim, c.config.n_layers):
        raise BadInput(f"teacher {teacher_dir} does not match {ckpt_path} (vocab, dim, layers)")
    teacher = Transformer.from_checkpoint_state(tcfg, read_tensors(teacher_dir, tcfg))
    student = c.model
    held = heldout(c.tokenizer, c.config, ac.n_windows)
    before = compare(teacher, student, held)
    progress(f"KL before {before['kl_mean']:.4f}")

    params = [student.pit.l_strict, student.pit.l_log_diag]
    if ac.train_body:
        params += [p for n, p in student.named_parameters() if not n.startswith("pit.")]
    for p in params:
        p.data = p.data.clone()  # loaded tensors may be read-only memory maps
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=ac.lr)
    stream = encode_docs(c.tokenizer, build_corpus(ac.corpus_bytes)[0], c.config.bos_id, c.config.eos_id)
    seq = min(ac.seq_len, c.config.max_seq_len)
    gen = torch.Generator().manual_seed(ac.seed)
    t0 = time.time()
    for step in range(ac.steps):
        starts = torch.randint(0, len(stream) - seq, (ac.batch_size,), generator=gen).tolist()
        batch = torch.stack([stream[s : s + seq] for s in starts])
        with torch.no_grad():
            target = teacher(batch)
        loss = kl_loss(target, student(batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == ac.steps - 1:
            progress(f"step {step:4d}  KL {loss.item():.4f}  {time.time() - t0:.0f}s")
    student.eval().requires_grad_(False)
    after = compare(teacher, student, held)
    progress(f"KL after {after['kl_mean']:.4f}")
    report = {"teacher": str(teacher_dir), "config": asdict(ac), "before": before, "after": after}
    save_checkpoint(out, student, c.tokenizer, {"adapt_report.json": json.dumps(report, indent=2)}, force=force)
    return report

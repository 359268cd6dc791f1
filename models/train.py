"""Trainer for the embedded default models: BPE tokenizer + a small decoder on 2 CPU cores.

    python -m pit_export.models.train --out models/pit-tiny --tying pit
    pit-export train --out models/pit-tiny --tying pit          (same thing)

Reproducible: fixed seeds, deterministic corpus (see corpus.py), single process.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .checkpoint import load_checkpoint, save_checkpoint
from .corpus import build_corpus, load_heldout, save_heldout
from .pit import ModelConfig, Transformer

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]


@dataclass
class TrainConfig:
    steps: int = 800
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1234
    eval_every: int = 150
    z_lr_scale: float = 0.25  # Z's entries are ~V^-1/2, 4-5x smaller than a tied table's: scale its step to match
    threads: int = 2
    model: ModelConfig = field(default_factory=ModelConfig)


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def encode_docs(tok: Tokenizer, docs: list[str], bos: int, eos: int) -> torch.Tensor:
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids += [bos, *enc.ids, eos]
    return torch.tensor(ids, dtype=torch.long)


MAX_TEXT_BYTES = 256 << 20


def text_windows(tok: Tokenizer, cfg: ModelConfig, path, n_windows: int, seq_len: int | None = None) -> torch.Tensor:
    """A user's plain-text file (UTF-8, <= 256 MiB) as windows [n, seq_len], tokenized with the model's tokenizer as
    one document; ValueError when it gives fewer than n_windows windows."""
    from pathlib import Path

    path, seq_len = Path(path), seq_len or cfg.max_seq_len
    if not path.is_file():
        raise ValueError(f"--eval-text {path}: no such file")
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise ValueError(f"--eval-text {path}: {path.stat().st_size:,} bytes, beyond {MAX_TEXT_BYTES:,}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--eval-text {path}: not UTF-8 text (byte {e.start})") from None
    stream = encode_docs(tok, [text], cfg.bos_id, cfg.eos_id)
    n = len(stream) // seq_len
    if n < max(1, n_windows):
        raise ValueError(
            f"--eval-text {path}: {len(stream):,} tokens give {n} window(s) of {seq_len}; {n_windows} requested "
            "(a longer text, or fewer --n-windows)"
        )
    return stream[: n * seq_len].view(n, seq_len)


def heldout_windows(tok: Tokenizer, cfg: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    """Non-overlapping held-out windows [n, seq_len]; the evaluation set for perplexity and parity."""
    seq_len = seq_len or cfg.max_seq_len
    stream = encode_docs(tok, load_heldout(), cfg.bos_id, cfg.eos_id)
    n = len(stream) // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def unigram_perplexity(train_ids: torch.Tensor, held_ids: torch.Tensor, vocab: int) -> float:
    """Add-one smoothed unigram model fitted on the training stream: the baseline a real LM must beat."""
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[held_ids].mean().item())


@torch.no_grad()
def perplexity(model: Transformer, windows: torch.Tensor, batch: int = 8) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        logits = model(w[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids[-model.cfg.max_seq_len :]]))[0, -1].argmax()))
    return ids[len(prompt) :]


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    t = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * t))


def make_optimizer(model: Transformer, tc: TrainConfig) -> torch.optim.Optimizer:
    # Decay only the body's matrices: decaying L would pull T towards its diagonal, decaying a table shrinks logits.
    decay, keep, z = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name == "pit.z":
            z.append(p)
        else:
            (decay if p.dim() == 2 and name.startswith("layers") else keep).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    if z:  # trained Z is re-orthonormalised (polar retraction) after every step
        groups.append({"params": z, "weight_decay": 0.0, "lr_scale": tc.z_lr_scale})
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95))


def train(out: Path, tc: TrainConfig, tokenizer_from: Path | None = None, progress=print, force: bool = False) -> dict:
    torch.manual_seed(tc.seed)
    torch.set_num_threads(tc.threads)
    cfg = tc.model
    train_docs, held_docs = build_corpus()
    save_heldout(held_docs)
    if tokenizer_from:  # a baseline shares the PIT model's tokenizer so the two are comparable
        tok = load_checkpoint(tokenizer_from).tokenizer
    else:
        tok = train_tokenizer(train_docs, cfg.vocab_size)
    cfg.bos_id, cfg.eos_id = tok.token_to_id("<|bos|>"), tok.token_to_id("<|eos|>")
    stream = encode_docs(tok, train_docs, cfg.bos_id, cfg.eos_id)
    held = heldout_windows(tok, cfg, tc.seq_len + 1)
    progress(f"corpus: {len(train_docs)} train files, {len(stream):,} tokens; held-out {held.numel():,} tokens")

    model = Transformer(cfg)
    opt = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(tc.seed)
    history, t0 = [], time.time()
    for step in range(tc.steps):
        model.train()
        starts = torch.randint(0, len(stream) - tc.seq_len - 1, (tc.batch_size,), generator=gen)
        batch = torch.stack([stream[s : s + tc.seq_len + 1] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc) * g.get("lr_scale", 1.0)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        if cfg.tying == "pit" and cfg.train_z:
            model.pit.reorthonormalise()
        if step % 10 == 0 or step == tc.steps - 1:
            progress(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step, tc):.2e}  {time.time() - t0:.0f}s")
        if (step + 1) % tc.eval_every == 0 or step == tc.steps - 1:
            ppl = perplexity(model, held)
            history.append({"step": step + 1, "train_loss": loss.item(), "heldout_ppl": ppl})
            progress(f"step {step + 1}: held-out perplexity {ppl:.2f}")

    model.eval().requires_grad_(False)
    held_ids = held[:, 1:].flatten()
    prompt = "def read_file(path):\n"
    sample = tok.decode(greedy(model, tok.encode(prompt).ids, 64))
    metrics = {
        "tying": cfg.tying,
        "params": sum(p.numel() for p in model.state_for_checkpoint().values()),
        "train_tokens_seen": tc.steps * tc.batch_size * tc.seq_len,
        "heldout_tokens": held_ids.numel(),
        "heldout_ppl": history[-1]["heldout_ppl"],
        "unigram_ppl": unigram_perplexity(stream, held_ids, cfg.vocab_size),
        "train_seconds": round(time.time() - t0, 1),
        "sample_prompt": prompt,
        "sample_greedy": sample,
        "history": history,
        "train_config": {k: v for k, v in asdict(tc).items() if k != "model"},
    }
    card = model_card(metrics)
    save_checkpoint(
        out, model, tok, {"train_metrics.json": json.dumps(metrics, indent=2), "README.md": card}, force=force
    )
    return metrics


def model_card(m: dict) -> str:
    return (
        f"# {m['tying']} default model\n\n"
        f"Trained by `pit-export train` on CPython standard-library sources (PSF license), "
        f"{m['train_tokens_seen']:,} tokens seen, {m['train_seconds']:.0f} s on CPU.\n\n"
        f"| metric | value |\n|---|---|\n| parameters | {m['params']:,} |\n"
        f"| held-out perplexity | {m['heldout_ppl']:.2f} |\n"
        f"| unigram baseline perplexity | {m['unigram_ppl']:.2f} |\n\n"
        f"Greedy sample for `{m['sample_prompt']!r}`:\n\n```python\n{m['sample_prompt']}{m['sample_greedy']}\n```\n"
    )


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tying", choices=["pit", "tied", "untied"], default="pit")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokenizer-from", type=Path, default=None)
    ap.add_argument("--train-z", action="store_true", help="PIT: train Z (re-orthonormalised each step)")
    a = ap.parse_args(argv)
    tc = TrainConfig(steps=a.steps, threads=a.threads, model=ModelConfig(tying=a.tying, train_z=a.train_z))
    m = train(a.out, tc, a.tokenizer_from)
    print(json.dumps({k: v for k, v in m.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()

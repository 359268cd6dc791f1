"""Timed greedy runs through any Session. numpy only, so the emulated-ARM64 runner (remote_runner.py) times with the
same code as the host bench."""

from __future__ import annotations

import time

import numpy as np


def prompt_tokens(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Fixed pseudo-random ids: decode cost depends on how many tokens are fed, not on which."""
    return np.random.default_rng(seed).integers(2, vocab, n, dtype=np.int64)


def timed_run(sess, prompt: np.ndarray, gen: int, keep_logits: bool = False) -> dict:
    """One greedy run: prefill (time to first token includes picking it), then `gen` timed decode steps."""
    sess.reset()
    t0 = time.perf_counter()
    prefill = sess.prefill(prompt, 0, last_only=True)
    tok = int(np.argmax(prefill[-1]))
    ttft = time.perf_counter() - t0
    tokens, steps, logits = [tok], [], []
    for i in range(gen):
        t = time.perf_counter()
        out = sess.decode(tok, len(prompt) + i)
        tok = int(np.argmax(out))
        steps.append(time.perf_counter() - t)
        tokens.append(tok)
        if keep_logits:
            logits.append(out)
    run = {"ttft": ttft, "steps": steps, "tokens": tokens}
    if keep_logits:
        run["prefill_logits"], run["decode_logits"] = prefill, np.stack(logits)
    return run

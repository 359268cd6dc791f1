"""Sampled generation through any Session's prefill + decode, and a side-by-side of sessions on one seed.

Plain functions (gpt-fast style): `sample` picks one token from a logits row, `generate` runs the prefill + decode
loop of `greedy_generate` with it, `compare` runs several sessions on the same seed and `render` tabulates them.
Temperature 0 is exactly greedy; validation keeps using `greedy_generate`, which this module does not touch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
from rich.table import Table
from rich.text import Text

from pit_export.errors import BadInput
from pit_export.runtimes.base import Session, decode_loop


def check_sampling(temperature: float, top_p: float) -> tuple[float, float]:
    """(temperature, top_p) as floats, or a one-line BadInput when out of range (T >= 0 and finite, 0 < top_p <= 1)."""
    try:
        t, p = float(temperature), float(top_p)
    except (TypeError, ValueError):
        raise BadInput(f"temperature and top-p must be numbers, got {temperature!r} and {top_p!r}") from None
    if not (math.isfinite(t) and t >= 0):
        raise BadInput(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not (0 < p <= 1):  # NaN fails this too
        raise BadInput(f"top-p must be in (0, 1], got {top_p!r}")
    return t, p


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """One token id from a logits row [V].

    temperature 0: argmax (exactly what greedy decoding picks; rng is not used). Otherwise softmax(logits / T) in
    float64, restricted to the nucleus (the fewest most probable tokens whose probability sums to >= top_p; at least
    one), renormalised, and one uniform draw from rng mapped through the cumulative distribution in token-id order.
    Token-id order (not probability order) keeps the draw stable across sessions whose logits differ slightly: the
    same uniform lands on a different token only when it falls within that difference of a boundary.
    """
    temperature, top_p = check_sampling(temperature, top_p)
    x = np.asarray(logits)
    if x.ndim != 1 or x.size == 0:
        raise BadInput(f"sample takes a non-empty 1-D logits row, got shape {x.shape}")
    if temperature == 0:
        return int(np.argmax(x))
    z = x.astype(np.float64)
    if np.isnan(z).any() or np.isposinf(z).any():
        raise BadInput("logits have NaN or +inf values; cannot sample")
    m = z.max()
    if m == -np.inf:
        raise BadInput("all logits are -inf; cannot sample")
    p = np.exp((z - m) / temperature)  # the max is exp(0) = 1; -inf -> 0; a tiny T underflows the rest to 0
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")  # most probable first, ties by token id
        cum = np.cumsum(p[order])
        k = int(np.searchsorted(cum, top_p, side="left")) + 1  # first prefix reaching top_p, inclusive
        k = min(k, int(np.count_nonzero(p)))  # rounding can leave cum[-1] < top_p; never keep a zero
        keep = np.zeros_like(p)
        keep[order[:k]] = p[order[:k]]
        p = keep
    cdf = np.cumsum(p)
    u = rng.random() * cdf[-1]
    i = int(np.searchsorted(cdf, u, side="right"))  # first token whose cdf exceeds u: never a zero-mass token
    if i >= len(p):  # u rounded up to cdf[-1]: the last token with mass
        i = int(np.flatnonzero(p)[-1])
    return i


def generate(
    session: Session,
    prompt_ids: list[int],
    max_new: int,
    stop: Iterable[int] = frozenset(),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = 0,
) -> list[int]:
    """Prefill the prompt, then decode up to max_new tokens (never past session.max_seq_len), each one drawn by
    `sample` from one np.random.default_rng(seed); a stop token ends it and is included. Temperature 0 returns
    exactly greedy_generate's tokens."""
    check_sampling(temperature, top_p)
    if not prompt_ids:
        raise BadInput("empty prompt")
    if int(max_new) < 0:
        raise BadInput(f"max new tokens must be >= 0, got {max_new}")
    stop = set(stop)
    try:
        rng = np.random.default_rng(seed)
    except (TypeError, ValueError) as e:
        raise BadInput(f"bad seed {seed!r}: {str(e).splitlines()[0][:200]}") from None
    return decode_loop(session, prompt_ids, int(max_new), stop, lambda logits: sample(logits, temperature, top_p, rng))


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where a and b differ (a length mismatch counts at the shorter length)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(
    sessions: list[tuple[str, Session]],
    prompt_ids: list[int],
    max_new: int,
    stop: Iterable[int] = frozenset(),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = 0,
) -> list[dict]:
    """`generate` on each (label, session) with the same seed; per session {"label", "tokens", "first_diff"}, where
    first_diff is the index of the first token that differs from the first session's (the reference), None if none.
    """
    check_sampling(temperature, top_p)
    stop = set(stop)
    rows: list[dict] = []
    for label, sess in sessions:
        toks = generate(sess, prompt_ids, max_new, stop, temperature, top_p, seed)
        diff = None if not rows else first_difference(rows[0]["tokens"], toks)
        rows.append({"label": label, "tokens": toks, "first_diff": diff})
    return rows


def _split_text(tokens: list[int], k: int, decode: Callable[[list[int]], str]) -> tuple[str, str]:
    """The decoded continuation split where token k starts: (text before, text from there on)."""
    head, whole = decode(tokens[:k]), decode(tokens)
    if whole.startswith(head):  # decoding whole keeps multi-byte characters across the split intact
        return head, whole[len(head) :]
    return head, decode(tokens[k:])


def render(rows: list[dict], decode: Callable[[list[int]], str], title: str | None = None) -> Table:
    """A table session | continuation | first difference; a diverging row shows its text from the first
    differing token on in red. All text goes in as rich Text, so brackets in model output are never markup."""
    table = Table(title=title, show_lines=True)
    table.add_column("session", no_wrap=True)
    table.add_column("continuation", overflow="fold")
    table.add_column("first difference", no_wrap=True)
    for r in rows:
        toks, k = list(r["tokens"]), r["first_diff"]
        text = Text()
        if k is None:
            text.append(decode(toks))
            where = Text("identical", style="green")
        else:
            head, tail = _split_text(toks, k, decode)
            text.append(head)
            text.append(tail if tail else "(ends here)", style="bold red")
            where = Text(f"token {k}", style="red")
        table.add_row(Text(str(r["label"])), text, where)
    return table

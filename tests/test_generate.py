"""Sampled generation (pit_export.generate): greedy at temperature 0, seeded draws, the sampling distribution against
softmax(logits / T) with nucleus filtering, argument checks, and the session side-by-side."""

import io

import numpy as np
import pytest
from pit_export.runtimes.base import greedy_generate
from rich.console import Console
from rich.table import Table

from pit_export.errors import BadInput
from pit_export.generate import compare, first_difference, generate, render, sample

from .conftest import DEFAULT_MODEL

PROMPT = "def read_file(path):"


@pytest.fixture(scope="module")
def folded(pit_ckpt):
    from pit_export.runtimes.pytorch import FoldedSession

    from pit_export.fold import fold

    return FoldedSession(fold(pit_ckpt, "shared-z")[0], 2)


@pytest.fixture(scope="module")
def reference(pit_ckpt):
    from pit_export.runtimes.pytorch import ReferenceSession

    return ReferenceSession(pit_ckpt.model, 2)


@pytest.fixture(scope="module")
def prompt_ids(pit_ckpt):
    return pit_ckpt.tokenizer.encode(PROMPT).ids


@pytest.fixture(scope="module")
def eos(pit_ckpt):
    return {pit_ckpt.config.eos_id}


def softmax64(logits, t):
    z = np.asarray(logits, dtype=np.float64) / t
    p = np.exp(z - z.max())
    return p / p.sum()


def nucleus(p, top_p):
    """The expected nucleus from the definition: the fewest most probable tokens whose mass reaches top_p."""
    order = np.argsort(-p, kind="stable")
    k = int(np.argmax(np.cumsum(p[order]) >= top_p)) + 1
    q = np.zeros_like(p)
    q[order[:k]] = p[order[:k]]
    return q / q.sum()


def assert_matches(counts, p, n):
    """Each token's count is Binomial(n, p_i): within 5 sigma (+1 for the discreteness), and p_i = 0 is never drawn."""
    for i, (c, pi) in enumerate(zip(counts, p, strict=True)):
        if pi == 0:
            assert c == 0, f"token {i} has probability 0 but was drawn {c} times"
        else:
            tol = 5 * np.sqrt(n * pi * (1 - pi)) + 1
            assert abs(c - n * pi) <= tol, f"token {i}: {c} draws, expected {n * pi:.1f} +- {tol:.1f}"


# ---- sample ----

LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -np.inf, 3.0, 1.0], dtype=np.float32)
N_DRAWS = 20000


@pytest.mark.parametrize("t", [1.0, 0.7, 2.5])
def test_sample_distribution_is_tempered_softmax(t):
    rng = np.random.default_rng(1234)
    draws = [sample(LOGITS, t, 1.0, rng) for _ in range(N_DRAWS)]
    counts = np.bincount(draws, minlength=len(LOGITS))
    assert_matches(counts, softmax64(LOGITS, t), N_DRAWS)


@pytest.mark.parametrize("t,top_p", [(1.0, 0.8), (0.7, 0.5), (2.5, 0.8)])
def test_sample_top_p_keeps_the_nucleus_only(t, top_p):
    p = softmax64(LOGITS, t)
    q = nucleus(p, top_p)
    assert 0 < np.count_nonzero(q) < np.count_nonzero(p)  # the case actually filters something
    rng = np.random.default_rng(99)
    draws = [sample(LOGITS, t, top_p, rng) for _ in range(N_DRAWS)]
    counts = np.bincount(draws, minlength=len(LOGITS))
    assert_matches(counts, q, N_DRAWS)  # excluded tokens have q = 0: never drawn


def test_sample_temperature_zero_and_tiny_top_p_are_argmax():
    rng = np.random.default_rng(0)
    for seed in range(20):
        x = np.random.default_rng(seed).normal(size=97).astype(np.float32)
        assert sample(x, 0.0, 1.0, rng) == int(np.argmax(x))
        assert sample(x, 1.0, 1e-9, rng) == int(np.argmax(x))


def test_sample_uses_the_rng_reproducibly():
    a = [sample(LOGITS, 1.0, 0.9, np.random.default_rng(5)) for _ in range(3)]
    assert len(set(a)) == 1
    r1, r2 = np.random.default_rng(7), np.random.default_rng(7)
    assert [sample(LOGITS, 0.8, 1.0, r1) for _ in range(50)] == [sample(LOGITS, 0.8, 1.0, r2) for _ in range(50)]


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"top_p": 0.0},
        {"top_p": -0.5},
        {"top_p": 1.01},
        {"top_p": float("nan")},
        {"logits": np.zeros((2, 3), dtype=np.float32)},
        {"logits": np.array([], dtype=np.float32)},
        {"logits": np.array([0.0, np.nan], dtype=np.float32)},
        {"logits": np.array([-np.inf, -np.inf], dtype=np.float32)},
    ],
)
def test_sample_bad_arguments(kw):
    args = {"logits": LOGITS, "temperature": 1.0, "top_p": 1.0} | kw
    with pytest.raises(BadInput) as e:
        sample(args["logits"], args["temperature"], args["top_p"], np.random.default_rng(0))
    assert "\n" not in str(e.value)


# ---- generate ----


def test_temperature_zero_is_greedy_on_the_reference(reference, prompt_ids, eos):
    want = greedy_generate(reference, prompt_ids, 8, eos)
    assert generate(reference, prompt_ids, 8, eos, temperature=0.0, top_p=0.5, seed=3) == want


def test_temperature_zero_and_tiny_top_p_are_greedy_on_folded(folded, prompt_ids, eos):
    want = greedy_generate(folded, prompt_ids, 16, eos)
    assert generate(folded, prompt_ids, 16, eos) == want
    assert generate(folded, prompt_ids, 16, eos, temperature=1.0, top_p=1e-9, seed=11) == want


def test_seeds(folded, prompt_ids, eos):
    a = generate(folded, prompt_ids, 32, eos, temperature=1.0, seed=0)
    assert generate(folded, prompt_ids, 32, eos, temperature=1.0, seed=0) == a
    # Another seed (an independent draw) reproduces `a` with probability P(a): compute P(a) from the model's own
    # logits, require it to be negligible, then require another seed to differ.
    logits = folded.prefill(np.asarray(prompt_ids + a), 0)[len(prompt_ids) - 1 : len(prompt_ids) + len(a) - 1]
    z = logits.astype(np.float64)
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    log_p_a = float(logp[np.arange(len(a)), a].sum())
    assert len(a) == 32 and log_p_a < np.log(1e-6), f"P(a) = exp({log_p_a:.1f}) is not negligible"
    assert generate(folded, prompt_ids, 32, eos, temperature=1.0, seed=1) != a


def test_generate_stops_at_the_context(folded, pit_ckpt, eos):
    ctx = folded.max_seq_len
    ids = pit_ckpt.tokenizer.encode(PROMPT * 40).ids[: ctx - 3]
    assert len(ids) == ctx - 3
    out = generate(folded, ids, 10, set(), temperature=0.9, top_p=0.95, seed=0)
    assert len(out) == 3  # never past max_seq_len; no stop tokens to end it early
    assert generate(folded, ids, 10, set()) == greedy_generate(folded, ids, 10, set())


def test_generate_stop_token_ends_and_is_kept(folded, prompt_ids):
    a = generate(folded, prompt_ids, 16, set(), temperature=0.9, seed=4)
    stop_at = a[5]
    k = a.index(stop_at)  # the first occurrence ends it
    assert generate(folded, prompt_ids, 16, {stop_at}, temperature=0.9, seed=4) == a[: k + 1]


@pytest.mark.parametrize(
    "kw",
    [{"prompt_ids": []}, {"max_new": -1}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 2.0}, {"seed": -1}],
)
def test_generate_bad_arguments(folded, prompt_ids, kw):
    args = {"prompt_ids": prompt_ids, "max_new": 4, "temperature": 1.0, "top_p": 1.0, "seed": 0} | kw
    with pytest.raises(BadInput) as e:
        generate(folded, args["prompt_ids"], args["max_new"], set(), args["temperature"], args["top_p"], args["seed"])
    assert "\n" not in str(e.value)


# ---- compare / render ----


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2, 3], [1, 2]) == 2
    assert first_difference([], []) is None


def test_compare_with_itself_is_identical(folded, prompt_ids, eos):
    rows = compare([("a", folded), ("b", folded)], prompt_ids, 16, eos, 0.8, 0.95, 0)
    assert [r["label"] for r in rows] == ["a", "b"]
    assert rows[0]["tokens"] == rows[1]["tokens"]
    assert [r["first_diff"] for r in rows] == [None, None]


def test_compare_reference_and_folded(reference, folded, prompt_ids, eos, pit_ckpt):
    n = 8
    rows = compare([("reference", reference), ("folded", folded)], prompt_ids, n, eos, 0.8, 0.95, 0)
    assert [r["label"] for r in rows] == ["reference", "folded"]
    assert rows[0]["first_diff"] is None
    # each row is that session's own seed-0 generate
    assert rows[1]["tokens"] == generate(folded, prompt_ids, n, eos, 0.8, 0.95, 0)
    V = pit_ckpt.config.vocab_size
    for r in rows:
        assert 1 <= len(r["tokens"]) <= n
        assert all(0 <= t < V for t in r["tokens"])
        assert len(r["tokens"]) == n or r["tokens"][-1] in eos
    ref, fol, d = rows[0]["tokens"], rows[1]["tokens"], rows[1]["first_diff"]
    if d is None:
        assert fol == ref
    else:
        assert isinstance(d, int) and 0 <= d <= min(len(ref), len(fol))
        assert fol[:d] == ref[:d] and (d == min(len(ref), len(fol)) or fol[d] != ref[d])


def test_render_marks_the_divergence_and_escapes():
    vocab = {0: "[bold]x[/bold]", 1: " a", 2: " b", 3: " [red]", 4: "\n"}

    def decode(ids):
        return "".join(vocab[i] for i in ids)

    rows = [
        {"label": "ref [x]", "tokens": [0, 1, 2, 4], "first_diff": None},
        {"label": "same", "tokens": [0, 1, 2, 4], "first_diff": None},
        {"label": "q", "tokens": [0, 1, 3, 2], "first_diff": 2},
        {"label": "short", "tokens": [0], "first_diff": 1},
    ]
    table = render(rows, decode)
    assert isinstance(table, Table) and len(table.columns) == 3 and table.row_count == len(rows)
    cont = list(table.columns[1].cells)
    diverged = cont[2]
    assert diverged.plain == decode(rows[2]["tokens"])
    red = [s for s in diverged.spans if "red" in str(s.style)]
    assert len(red) == 1 and (red[0].start, red[0].end) == (len(decode([0, 1])), len(diverged.plain))
    assert not [s for s in cont[0].spans if "red" in str(s.style)]
    buf = io.StringIO()
    Console(file=buf, width=200, color_system=None).print(table)
    text = buf.getvalue()
    for s in ("[bold]x[/bold]", "[red]", "ref [x]", "identical", "token 2", "token 1"):
        assert s in text  # model text and labels are shown literally, never read as markup


def test_cli_side_by_side_of_the_training_graph_and_an_artifact(tmp_path):
    """`generate CKPT --artifact A`: one row per session on one seed; an fp32 fold draws the training graph's tokens."""
    import json
    import subprocess
    import sys

    from pit_export.models.checkpoint import load_checkpoint

    from pit_export.fold import fold, save_folded

    ck = load_checkpoint(DEFAULT_MODEL)
    save_folded(tmp_path / "folded", *fold(ck, "untied"), ck)
    argv = [sys.executable, "-m", "pit_export", "generate", str(DEFAULT_MODEL), "--prompt", "def read_file(path):"]
    argv += ["--max-new-tokens", "24", "--temperature", "0.8", "--top-p", "0.95", "--seed", "0"]
    argv += ["--artifact", str(tmp_path / "folded"), "--json"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(p.stdout)["rows"]
    assert [r["label"] for r in rows][1:] == [str(tmp_path / "folded")]
    assert rows[0]["first_diff"] is None and len(rows[0]["tokens"]) > 0
    assert rows[1]["tokens"] == rows[0]["tokens"] and rows[1]["first_diff"] is None

"""Validation: compare any Session with the training graph, through the session's own entry points only.

Metrics (all computed in float64 from the sessions' outputs):
  logits      max |delta|, cosine (min, mean), KL(ref || art) mean and p99 per position, top-1 agreement,
              perplexity of both on held-out text and their ratio
  generation  greedy agreement: length of the common prefix of N greedy tokens / N
  interface   W = unembed(I_d), E = embed(0..V-1): max and Frobenius of W E - (W E)_ref  ((W E)_ref = I_d for PIT);
              token round trip unembed(embed(t)) vs the reference z_t Z^T: max |delta|, argmax agreement
Gates are data: a scheme name maps to {metric: (op, threshold)}.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from pit_export.runtimes.base import Session, greedy_generate

# Acceptance gates per quantization scheme (base name: 8da4w+emb4 is gated as 8da4w).
# fp32: the fold is exact up to op ordering; 1e-4 is coremltools' fp32 atol and ai-edge-torch's atol, well above the
#   derived forward-error bound of our folds (~1e-5 on these logit scales), and W E - I <= 1e-5 is ~40x the elementwise
#   rounding bound 2 gamma_{d+4} |W||E| of a d=192 fold. Greedy tokens must all agree (ai-edge-torch checks 30).
# fp16: top-1 >= 99 % of positions (half precision flips near-ties only) and perplexity within 0.5 %.
# int8: perplexity within 0.5 % (llama.cpp's Q8_0 costs ~0.04 % on Llama-3-8B: 8-bit weights are near-lossless).
# 4-bit: perplexity within 3 % (llama.cpp's Q4_K_M costs ~2.8 %: the usual accepted price of 4-bit weights).
GATES: dict[str, dict[str, tuple[str, float]]] = {
    "fp32": {
        "max_abs_logit": ("<=", 1e-4),
        "top1": (">=", 1.0),
        "greedy_agree": (">=", 1.0),
        "interface_err_max": ("<=", 1e-5),
    },
    # fp16 rounds every activation to 11 bits: on pit-tiny logits move by ~7e-3 (at most 5e-2), and top-1 can only
    # flip where the reference's top-2 margin is below twice that: a guaranteed >= 0.98, measured 0.999 agreement.
    # 0.99 leaves 10x headroom on the flip rate (tests/test_coreml.py checks the per-position margin bound).
    "fp16": {"ppl_ratio": ("<=", 1.005), "top1": (">=", 0.99)},
    "int8": {"ppl_ratio": ("<=", 1.005)},
    "8da4w": {"ppl_ratio": ("<=", 1.03)},
    "int4": {"ppl_ratio": ("<=", 1.03)},
    "palettize4": {"ppl_ratio": ("<=", 1.03)},  # 4-bit like int4: 16 levels per group, fitted by k-means
}
OPS: dict[str, Callable[[float, float], bool]] = {"<=": lambda v, t: v <= t, ">=": lambda v, t: v >= t}


@dataclass
class ValidateConfig:
    n_windows: int = 8  # held-out windows for logits/perplexity
    window_len: int | None = None  # default: the model's max_seq_len
    n_greedy: int = 64
    prompt_len: int = 32
    round_trip_chunk: int = 128  # tokens per round-trip call: its [chunk, V] float64 pair is 100 MB at V = 49152
    eval_text: str | None = None  # a plain-text file scored instead of the shipped held-out split


@dataclass
class GateResult:
    metric: str
    op: str
    threshold: float
    value: float | None
    passed: bool


@dataclass
class ValidationResult:
    session: str
    scheme: str
    metrics: dict[str, float]
    gates: list[GateResult] = field(default_factory=list)
    # arrays for the report's plots (per-position KL, |delta logit| histogram, W E - I); not part of to_dict()
    details: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    artifact: str | None = None  # the folder validated, where there is one

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def failures(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]

    def to_dict(self) -> dict:
        return {
            "session": self.session,
            "artifact": self.artifact,
            "scheme": self.scheme,
            "passed": self.passed,
            "metrics": self.metrics,
            "gates": [asdict(g) for g in self.gates],
        }


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# log10 bins for the elementwise |delta logit| histogram (the report plots it); values below 1e-12 land in the first bin
ABS_BINS = np.concatenate([[0.0], np.logspace(-12, 3, 61)])


LOGIT_ROWS = 16  # positions scored at a time


def logits_metrics(ref: np.ndarray, art: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-position arrays for consecutive positions: ref/art [n, V] float64, targets [<= n] (the next tokens; the
    window's last position has none)."""
    lr, la = log_softmax(ref), log_softmax(art)
    cos = (ref * art).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(art, axis=-1) + 1e-300)
    idx = np.arange(len(targets))
    return {
        "abs": np.abs(ref - art).max(-1),
        "cos": cos,
        "kl": (np.exp(lr) * (lr - la)).sum(-1),
        "top1": (ref.argmax(-1) == art.argmax(-1)).astype(np.float64),
        "nll_ref": -lr[idx, targets],
        "nll_art": -la[idx, targets],
    }


def compare_logits(ref: Reference, art: Session, details: dict | None = None) -> dict[str, float]:
    """Logits metrics over the reference's windows; `details` (if given) receives per-position KL [windows, len]
    and the elementwise |delta| histogram counts over ABS_BINS."""
    acc: dict[str, list[np.ndarray]] = {}
    hist = np.zeros(len(ABS_BINS) - 1, dtype=np.int64)
    for i, w in enumerate(ref.windows):
        art.reset()
        art_w = art.prefill(w, 0)
        # float64 in slices of positions: a whole window's [n, V] float64 temporaries are GBs at V = 49152; the
        # reference's rows are read per slice too, so its window is never in memory whole beside the artifact's
        rows: dict[str, list[np.ndarray]] = {}
        for c in range(0, len(w), LOGIT_ROWS):
            r = ref.window_logits(i, slice(c, c + LOGIT_ROWS)).astype(np.float64)
            a = art_w[c : c + LOGIT_ROWS].astype(np.float64)
            for k, v in logits_metrics(r, a, w[c + 1 : c + 1 + LOGIT_ROWS]).items():
                rows.setdefault(k, []).append(v)
            hist += np.histogram(np.clip(np.abs(r - a), 0, ABS_BINS[-1]), ABS_BINS)[0]
        for k, v in rows.items():
            acc.setdefault(k, []).append(np.concatenate(v))
    m = {k: np.concatenate(v) for k, v in acc.items()}
    if details is not None:
        details["kl_per_position"] = np.stack(acc["kl"])
        details["abs_hist"] = hist
    nll_ref, nll_art = m["nll_ref"].mean(), m["nll_art"].mean()
    return {
        "max_abs_logit": float(m["abs"].max()),
        "cosine_min": float(m["cos"].min()),
        "cosine_mean": float(m["cos"].mean()),
        "kl_mean": float(m["kl"].mean()),
        "kl_p99": float(np.percentile(m["kl"], 99)),
        "top1": float(m["top1"].mean()),
        "ppl_ref": float(np.exp(nll_ref)),
        "ppl_art": float(np.exp(nll_art)),
        "ppl_ratio": float(np.exp(nll_art - nll_ref)),
        "positions": int(len(m["abs"])),
    }


def greedy_agreement(ref: Reference, art: Session) -> dict[str, float]:
    a, b = ref.greedy, greedy_generate(art, ref.greedy_prompt, len(ref.greedy))
    common = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return {"greedy_agree": common / max(1, len(a)), "greedy_tokens": len(a), "greedy_first_diff": common}


def interface_metrics(ref: Reference, art: Session, chunk: int = 128, details: dict | None = None) -> dict[str, float]:
    """W_out E vs the reference product and the token round trip, through art's own embed/unembed."""
    d, V = art.hidden_size, art.vocab_size
    from pit_export.fold import vocab_chunks

    # W E = sum over token chunks of W[:, c] E[c] in float64, W by blocks of its d rows (unembed of identity rows):
    # no d x V or V x d table is held whole, so the probes' own weights are the only full-size memory here. The price:
    # each token chunk is embedded once per row block (d / chunk times)
    WE = np.zeros((d, d))
    eye = np.eye(d, dtype=np.float32)
    for r in range(0, d, chunk):
        W_r = art.unembed(eye[r : r + chunk])  # rows x V
        for c in vocab_chunks(V):
            WE[r : r + chunk] += W_r[:, c].astype(np.float64) @ art.embed(np.arange(c.start, c.stop)).astype(np.float64)
    err = WE - ref.interface_target
    # the round trip, compared one vocab chunk at a time (a running argmax of the target): no [chunk, V] float64 row
    # block is held, only the artifact's own fp32 output
    rt_max, rt_agree = 0.0, 0
    for s in range(0, V, chunk):
        toks = np.arange(s, min(V, s + chunk))
        got = art.unembed(art.embed(toks))
        best, best_arg = np.full(len(toks), -np.inf), np.zeros(len(toks), dtype=np.int64)
        for c, want in ref.round_trip_target(toks):
            rt_max = max(rt_max, float(np.abs(got[:, c].astype(np.float64) - want).max()))
            m, arg = want.max(-1), want.argmax(-1) + c.start
            better = m > best  # strict: ties keep the first index, as argmax over the whole row does
            best[better], best_arg[better] = m[better], arg[better]
        rt_agree += int((got.argmax(-1) == best_arg).sum())
    if details is not None:
        details["interface_err"] = err
    return {
        "interface_err_max": float(np.abs(err).max()),
        "interface_err_fro": float(np.linalg.norm(err)),
        "round_trip_max_abs": rt_max,
        "round_trip_argmax": rt_agree / V,
    }


# every metric validate() reports, so a gate file cannot name one that never gets a value
METRICS = (
    "max_abs_logit cosine_min cosine_mean kl_mean kl_p99 top1 ppl_ref ppl_art ppl_ratio positions greedy_agree "
    "greedy_tokens greedy_first_diff interface_err_max interface_err_fro round_trip_max_abs round_trip_argmax"
).split()


def load_gates(path) -> dict[str, dict[str, tuple[str, float]]]:
    """A gate file overrides the defaults per scheme and metric, JSON: {"int4": {"ppl_ratio": ["<=", 1.02]}}.
    Unknown schemes, metrics or ops are bad input, never silently ignored."""
    import json
    from pathlib import Path

    from pit_export.errors import BadInput

    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"gate file {path}: {e}") from None
    if not isinstance(spec, dict):
        raise BadInput(f"gate file {path}: expected an object of schemes")
    table = {k: dict(v) for k, v in GATES.items()}
    for scheme, metrics in spec.items():
        if scheme not in GATES:
            raise BadInput(f"gate file {path}: unknown scheme {scheme!r} (known: {', '.join(GATES)})")
        if not isinstance(metrics, dict):
            raise BadInput(f"gate file {path}: {scheme}: expected an object of metrics")
        for metric, rule in metrics.items():
            if metric not in METRICS:
                raise BadInput(f"gate file {path}: {scheme}: unknown metric {metric!r}")
            if rule is None:  # null drops a default gate
                table[scheme].pop(metric, None)
                continue
            ok = isinstance(rule, list) and len(rule) == 2 and rule[0] in OPS
            ok = ok and isinstance(rule[1], int | float) and not isinstance(rule[1], bool) and np.isfinite(rule[1])
            if not ok:
                raise BadInput(f'gate file {path}: {scheme}.{metric}: expected ["<=" or ">=", number], got {rule!r}')
            table[scheme][metric] = (rule[0], float(rule[1]))
    return table


def gates_for(scheme: str, table: dict | None = None) -> dict[str, tuple[str, float]]:
    return (GATES if table is None else table).get(scheme.split("+")[0], {})


def check_gates(metrics: dict[str, float], scheme: str, gates=None) -> list[GateResult]:
    """`gates`: one scheme's {metric: (op, threshold)}; default: the scheme's entry in GATES."""
    spec = gates_for(scheme) if gates is None else gates
    out = []
    for metric, (op, thr) in spec.items():
        v = metrics.get(metric)
        out.append(GateResult(metric, op, thr, v, v is not None and bool(OPS[op](v, thr))))
    return out


def eval_windows(heldout: np.ndarray, cfg: ValidateConfig, max_seq_len: int) -> np.ndarray:
    """The windows validation runs on: n_windows spread evenly over the held-out split (it spans many files)."""
    L = min(cfg.window_len or max_seq_len, max_seq_len, heldout.shape[1])
    pick = np.linspace(0, len(heldout) - 1, min(cfg.n_windows, len(heldout))).round().astype(int)
    return np.asarray(heldout[pick, :L], dtype=np.int64)


class Reference:
    """The training graph's side of a validation, recorded once before any artifact is opened: window logits (in a
    temporary file, read back one window at a time), greedy tokens, the interface targets. Artifacts are then
    compared without the reference model in memory beside them (its interface tables wait in a file too), and
    several artifacts are compared against one recording."""

    def __init__(self, ref, heldout: np.ndarray, cfg: ValidateConfig, max_seq_len: int):
        self.windows = eval_windows(heldout, cfg, max_seq_len)
        self._file = tempfile.TemporaryFile(prefix="pit-reference-")
        self._shape = (len(self.windows[0]), ref.vocab_size)
        for w in self.windows:
            ref.reset()
            np.ascontiguousarray(ref.prefill(w, 0), dtype=np.float32).tofile(self._file)
        # a prompt that leaves room for greedy tokens within the context (short-context models)
        self.greedy_prompt = self.windows[-1, : min(cfg.prompt_len, max(1, max_seq_len // 2))].tolist()
        self.greedy = greedy_generate(ref, self.greedy_prompt, cfg.n_greedy)
        self.interface_target = ref.interface_target()
        self.round_trip_target = ref.round_trip_fn()  # tokens -> (vocab slice, float64 target); no table in memory
        self.vocab_size = ref.vocab_size

    def window_logits(self, i: int, positions: slice = slice(None)) -> np.ndarray:
        """Window i's logits [positions, V], read from the file."""
        n, V = self._shape
        start, stop, _ = positions.indices(n)
        self._file.seek((i * n + start) * V * 4)
        return np.fromfile(self._file, dtype=np.float32, count=max(0, stop - start) * V).reshape(-1, V)

    def close(self) -> None:
        self._file.close()
        self.round_trip_target.close()


def validate(
    ref,
    art: Session,
    heldout: np.ndarray | None = None,
    scheme: str = "fp32",
    cfg: ValidateConfig | None = None,
    progress: Callable[[str], None] | None = None,
    gates=None,
) -> ValidationResult:
    """ref: a Reference, or a reference session (recorded here over `heldout`, token windows [n, len] from the
    held-out split: models.train.heldout_windows)."""
    cfg = cfg or ValidateConfig()
    step = progress or (lambda _msg: None)
    if not isinstance(ref, Reference):
        step("reference")
        ref = Reference(ref, heldout, cfg, art.max_seq_len)
    if art.max_seq_len < ref.windows.shape[1]:
        from pit_export.errors import BadInput

        raise BadInput(f"{art.name}: context {art.max_seq_len} is shorter than the reference windows")
    details: dict[str, np.ndarray] = {}
    step("logits")
    metrics = compare_logits(ref, art, details)
    step("greedy")
    metrics |= greedy_agreement(ref, art)
    step("interface")
    metrics |= interface_metrics(ref, art, cfg.round_trip_chunk, details)
    return ValidationResult(art.name, scheme, metrics, check_gates(metrics, scheme, gates), details)


def heldout(ckpt, text: str | None = None, n_windows: int = 1) -> np.ndarray:
    """The evaluation text as windows: the shipped held-out split, or the user's text file (`--eval-text`, tokenized
    with the model's tokenizer; BadInput when too short for n_windows). validate() scores n_windows of them spread
    over it (eval_windows), the same ones for `pit-export validate`, `export` and the benchmarks."""
    from pit_export.models.train import heldout_windows, text_windows

    if text is None:
        return np.asarray(heldout_windows(ckpt.tokenizer, ckpt.config))
    import os

    try:
        st = os.stat(text)
        key = (id(ckpt.tokenizer), ckpt.config.max_seq_len, os.path.realpath(text), st.st_mtime_ns, st.st_size)
    except OSError:
        key = None  # text_windows says why
    hit = _TEXT_WINDOWS.get(key)
    if hit is not None and hit[0] is ckpt.tokenizer and len(hit[1]) >= n_windows:
        return hit[1]  # the CLI checked it before any work: tokenized once per run
    try:
        windows = np.asarray(text_windows(ckpt.tokenizer, ckpt.config, text, n_windows))
    except ValueError as e:
        from pit_export.errors import BadInput

        raise BadInput(str(e)) from None
    if key is not None:
        _TEXT_WINDOWS.clear()  # the one text of this run
        _TEXT_WINDOWS[key] = (ckpt.tokenizer, windows)  # the tokenizer held: its id is not reused meanwhile
    return windows


# heldout()'s last --eval-text: (tokenizer id, context, file, version) -> (tokenizer, windows)
_TEXT_WINDOWS: dict[tuple, tuple] = {}


def text_source(text: str | None) -> dict:
    """What the report and manifest say about the evaluation text: the shipped split, or the file and its sha256."""
    if text is None:
        return {"source": "held-out split (shipped)", "sha256": None}
    import hashlib

    h = hashlib.sha256()
    with open(text, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"source": str(text), "sha256": h.hexdigest()}


class Validator:
    """The one validation orchestrator: the checkpoint's training graph recorded once (on first use) as the Reference,
    then every session checked against that recording. `pit-export validate` (artifacts or in-memory folds) and the
    export pipeline (each target, each fallback scheme) both go through it, so a run records its reference once."""

    def __init__(self, ckpt, cfg: ValidateConfig | None = None, threads: int | None = 2, gates: dict | None = None):
        self.ckpt, self.cfg, self.threads, self.gates = ckpt, cfg or ValidateConfig(), threads, gates
        self._ref: Reference | None = None

    def record(self) -> Reference:
        """The reference, recorded now if it was not yet."""
        if self._ref is None:
            from pit_export.memory import release_file_pages
            from pit_export.models.checkpoint import WEIGHTS
            from pit_export.runtimes.pytorch import ReferenceSession

            session = ReferenceSession(self.ckpt.model, self.threads)
            windows = heldout(self.ckpt, self.cfg.eval_text, self.cfg.n_windows)
            self._ref = Reference(session, windows, self.cfg, self.ckpt.config.max_seq_len)
            # recorded: the model's mapped checkpoint pages go back before an artifact is opened beside it (clean
            # pages: a later fold reads them again from the file); 1.9 GB at 0.5B
            if getattr(self.ckpt, "path", None) is not None and self.ckpt.model is not None:
                release_file_pages(self.ckpt.path / WEIGHTS, list(self.ckpt.model.state_dict().values()), [])
        return self._ref

    def check(
        self,
        session: Session,
        scheme: str | None = None,
        label: str | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> ValidationResult:
        """Validate one session; `scheme` (default: the session's own) picks the gates, `label` names the artifact."""
        sch = scheme or getattr(session, "scheme", "fp32")
        res = validate(
            self.record(), session, scheme=sch, cfg=self.cfg, progress=progress, gates=gates_for(sch, self.gates)
        )
        res.artifact = label
        return res

    def close(self) -> None:
        if self._ref is not None:
            self._ref.close()
            self._ref = None

    def __enter__(self) -> Validator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

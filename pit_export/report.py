"""The run's report: manifest.json, report.json (for CI, with a JSON schema), report.md (for people) and plots.

Every number in the report is the ValidationResult of the artifact's own runtime, the same one `pit-export validate`
computes for that folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pit_export.export import file_manifest, tool_versions
from pit_export.validate import ABS_BINS, GateResult, text_source

PLOTS = {
    "kl_per_position": "plots/kl_per_position.png",
    "abs_logit_hist": "plots/abs_logit_hist.png",
    "interface_heatmap": "plots/interface_heatmap.png",
    "sizes": "plots/sizes.png",
}

# Artifact files that are not byte-identical across runs of the same inputs, and why; every other file is
# (tests/test_faults.py exports twice and compares the hashes).
NONDETERMINISM: dict[str, str] = {
    "model.ort": "onnxruntime writes its ORT-format flatbuffer in hash-map order: same size and graph, byte order"
    " varies between runs; model.onnx + model.onnx.data are reproducible and the source of truth",
}

_ARTIFACT = {
    "type": "object",
    "required": ["target", "folder", "status", "scheme", "layout", "bytes", "files", "metrics", "gates"],
    "properties": {
        "target": {"type": "string"},
        "folder": {"type": "string"},
        "status": {"enum": ["passed", "failed", "unavailable", "unvalidated"]},
        "scheme": {"type": ["string", "null"]},
        "layout": {"type": ["string", "null"]},
        "bytes": {"type": "integer", "minimum": 0},
        "files": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["bytes", "sha256"],
                "properties": {"bytes": {"type": "integer"}, "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
            },
        },
        "metrics": {"type": "object", "additionalProperties": {"type": "number"}},
        "gates": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["metric", "op", "threshold", "value", "passed"],
                "properties": {
                    "metric": {"type": "string"},
                    "op": {"enum": ["<=", ">="]},
                    "threshold": {"type": "number"},
                    "value": {"type": ["number", "null"]},
                    "passed": {"type": "boolean"},
                },
            },
        },
        "note": {"type": "string"},
    },
}
REPORT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["version", "passed", "checkpoint", "tools", "artifacts", "baseline", "plots"],
    "properties": {
        "version": {"const": 1},
        "passed": {"type": "boolean"},
        "checkpoint": {"type": "object", "required": ["path", "sha256", "config"]},
        "tools": {"type": "object", "additionalProperties": {"type": "string"}},
        "artifacts": {"type": "array", "items": _ARTIFACT},
        "baseline": {"type": "array", "items": _ARTIFACT},
        "plots": {"type": "object", "additionalProperties": {"type": "string"}},
        "nondeterministic": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def failure_text(g: GateResult) -> str:
    """'ppl_ratio = 1.052, gate <= 1.03 (misses by 0.022)'."""
    if g.value is None:
        return f"{g.metric} missing (gate {g.op} {g.threshold:g})"
    return f"{g.metric} = {g.value:.4g}, gate {g.op} {g.threshold:g} (misses by {abs(g.value - g.threshold):.3g})"


def _artifact_json(a) -> dict:
    v = a.validation
    return {
        "target": a.target,
        "folder": a.folder,
        "status": a.status,
        "backend": a.manifest.get("backend"),
        "scheme": a.scheme,
        "layout": a.layout,
        "bytes": a.bytes,
        "deploy_files": a.manifest.get("deploy_files", []),
        "files": a.files,
        "metrics": {k: float(x) for k, x in v.metrics.items()} if v else {},
        "gates": [g.__dict__ for g in v.gates] if v else [],
        "failures": [failure_text(g) for g in v.failures()] if v else [],
        "note": a.note,
        "rejected": a.rejected,
        "fold_report": a.manifest.get("fold_report", {}),
    }


MANIFEST_KEYS = (
    "target", "folder", "status", "note", "backend", "scheme", "layout", "bytes", "deploy_files", "files", "gates",
    "rejected",
)  # fmt: skip


def report_json(result, manifest: dict) -> dict:
    """`manifest`: the run's manifest.json (manifest() below): its checkpoint hash and tool versions are reused."""
    ck = result.checkpoint
    return {
        "version": 1,
        "passed": not result.failed,
        "checkpoint": {
            "path": str(ck.path),
            "sha256": manifest["checkpoint"]["files"]["model.safetensors"]["sha256"],
            "config": ck.config.__dict__,
        },
        "tools": manifest["tools"],
        "eval_text": manifest["eval_text"],
        "artifacts": [_artifact_json(a) for a in result.artifacts],
        "baseline": [_artifact_json(a) for a in result.baseline],
        "plots": PLOTS,
        "nondeterministic": {
            f"{a.folder}/{f}": NONDETERMINISM[Path(f).name]
            for a in result.artifacts
            for f in a.files
            if Path(f).name in NONDETERMINISM
        },
    }


# ---------------------------------------------------------------- plots


def plots(result, root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (root / "plots").mkdir(exist_ok=True)
    done = [a for a in result.artifacts if a.validation is not None]

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for a in done:
        kl = a.validation.details["kl_per_position"].mean(0)
        ax.plot(np.arange(len(kl)), np.maximum(kl, 1e-12), label=f"{a.target} ({a.scheme})")
    ax.set(yscale="log", xlabel="position in window", ylabel="KL(ref || artifact), mean over windows")
    ax.set_title("Per-position KL divergence from the training graph")
    _finish(fig, ax, root / PLOTS["kl_per_position"], bool(done))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for a in done:
        h = a.validation.details["abs_hist"]
        ax.stairs(h / max(1, h.sum()), np.maximum(ABS_BINS, 1e-12), label=f"{a.target} ({a.scheme})")
    ax.set(xscale="log", xlabel="|logit(artifact) - logit(ref)|", ylabel="fraction of logits")
    ax.set_title("Elementwise logit error")
    _finish(fig, ax, root / PLOTS["abs_logit_hist"], bool(done))

    fig, axes = plt.subplots(1, max(1, len(done)), figsize=(3.6 * max(1, len(done)), 3.4), squeeze=False)
    for ax, a in zip(axes[0], done, strict=False):
        err = np.abs(a.validation.details["interface_err"])
        im = ax.imshow(np.log10(np.maximum(err, 1e-12)), cmap="viridis")
        ax.set_title(f"{a.target}: log10 |W E - I|\nmax {err.max():.2g}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("Round-trip interface through the artifact's embed / unembed")
    fig.tight_layout()
    fig.savefig(root / PLOTS["interface_heatmap"], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [a.target for a in result.artifacts if a.status != "unavailable"]
    base = {b.target: b for b in result.baseline if b.status != "unavailable"}
    x = np.arange(len(names))
    pit = [next(a.bytes for a in result.artifacts if a.target == n) / 1e6 for n in names]
    ax.bar(x - 0.2, pit, 0.4, label="PIT")
    ax.bar(x + 0.2, [base[n].bytes / 1e6 if n in base else 0 for n in names], 0.4, label="tied baseline")
    ax.set_xticks(x, names)
    ax.set(ylabel="artifact size (MB)", title="Artifact size: PIT vs tied baseline (same preset)")
    _finish(fig, ax, root / PLOTS["sizes"], bool(names))


def _finish(fig, ax, path: Path, has_data: bool):
    if has_data:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no validated artifacts", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)


# ---------------------------------------------------------------- markdown

_COLUMNS = (
    ("model MB", lambda a, m: f"{a.bytes / 1e6:.2f}"),
    ("ppl ratio", lambda a, m: f"{m['ppl_ratio']:.4f}"),
    ("KL mean", lambda a, m: f"{m['kl_mean']:.2e}"),
    ("top-1", lambda a, m: f"{m['top1']:.3f}"),
    ("max abs Δlogit", lambda a, m: f"{m['max_abs_logit']:.2e}"),
    ("W·E−I max", lambda a, m: f"{m['interface_err_max']:.2e}"),
    ("greedy agree", lambda a, m: f"{m['greedy_agree']:.2f}"),
)


COMPACT = ("model MB", "ppl ratio", "top-1", "W·E−I max")  # what fits a terminal


def summary_rows(artifacts, columns=None) -> list[list[str]]:
    rows = []
    for a in artifacts:
        m = a.validation.metrics if a.validation else None
        cells = [f(a, m) if m else "–" for c, f in _COLUMNS if columns is None or c in columns]
        rows.append([a.folder, a.scheme or "–", a.layout or "–", *cells, a.status])
    return rows


def summary_header(columns=None) -> list[str]:
    return ["artifact", "scheme", "layout", *(c for c, _ in _COLUMNS if columns is None or c in columns), "status"]


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def report_md(result, rep: dict) -> str:
    ck = result.checkpoint
    cfg = ck.config
    lines = [
        f"# pit-export report: {Path(ck.path).name}",
        "",
        f"**{'PASSED' if rep['passed'] else 'FAILED'}** — checkpoint `{ck.path}`"
        f" (sha256 `{rep['checkpoint']['sha256'][:16]}…`),"
        f" {cfg.tying}, V={cfg.vocab_size}, d={cfg.dim}, {cfg.n_layers} layers, context {cfg.max_seq_len}.",
        "",
        "Every artifact was run through its own runtime and compared with the training graph on "
        + _text_line(rep["eval_text"])
        + f" ({result.options.n_windows} windows of {cfg.max_seq_len} tokens,"
        f" {result.options.n_greedy} greedy tokens).",
        "",
        "## Artifacts",
        "",
        _md_table(summary_header(), summary_rows(result.artifacts)),
        "",
    ]
    failures = [(a, f) for a in rep["artifacts"] for f in a["failures"]]
    if failures:
        lines += ["## Failed gates", ""] + [f"- **{a['target']}** ({a['scheme']}): {f}" for a, f in failures] + [""]
    notes = [a for a in result.artifacts if a.note]
    if notes:
        lines += ["## Notes", ""] + [f"- **{a.target}**: {a.note}" for a in notes] + [""]
    if result.baseline:
        lines += [
            "## PIT vs tied baseline",
            "",
            f"Baseline checkpoint `{result.options.baseline.path}` exported with the same presets.",
            "",
            _md_table(summary_header(), summary_rows(result.baseline)),
            "",
            "| target | PIT MB | tied MB | PIT / tied |",
            "|---|---|---|---|",
        ]
        base = {b.target: b for b in result.baseline}
        for a in result.artifacts:
            b = base.get(a.target)
            if b is not None and b.bytes and a.bytes:
                lines.append(f"| {a.target} | {a.bytes / 1e6:.2f} | {b.bytes / 1e6:.2f} | {a.bytes / b.bytes:.3f} |")
        lines.append("")
    lines += ["## Gates", "", "| target | metric | value | gate | ok |", "|---|---|---|---|---|"]
    for a in rep["artifacts"]:
        for g in a["gates"]:
            val = "missing" if g["value"] is None else f"{g['value']:.4g}"
            ok = "✔" if g["passed"] else "✘"
            lines.append(f"| {a['target']} | {g['metric']} | {val} | {g['op']} {g['threshold']:g} | {ok} |")
    lines += ["", "## Plots", ""] + [f"![{k}]({p})" for k, p in PLOTS.items()] + [""]
    folds = [(a.target, a.manifest.get("fold_report", {})) for a in result.artifacts if a.manifest]
    if folds:
        lines += [
            "## Fold",
            "",
            "| target | layout | cond(T) | W·E−I max (fp32 fold) | rounding bound |",
            "|---|---|---|---|---|",
        ]
        for t, f in folds:
            lines.append(
                f"| {t} | {f.get('layout')} | {f.get('cond_T', float('nan')):.4g} | "
                f"{f.get('interface_err_max', float('nan')):.2e} | {f.get('interface_bound_max', float('nan')):.2e} |"
            )
        lines.append("")
    if rep["nondeterministic"]:
        lines += ["## Reproducibility", ""] + [f"- {k}: {v}" for k, v in rep["nondeterministic"].items()] + [""]
    lines += ["## Tools", "", ", ".join(f"{k} {v}" for k, v in rep["tools"].items()), ""]
    return "\n".join(lines)


def _text_line(text: dict) -> str:
    if text["sha256"] is None:
        return "the shipped held-out text"
    return f"`{text['source']}` (sha256 `{text['sha256'][:16]}…`)"


def manifest(result) -> dict:
    """The run's manifest.json: what went in, what came out, which gates held."""
    ck = result.checkpoint

    def entry(a) -> dict:  # the report's artifact entry, less metrics, failures and fold report
        full = _artifact_json(a)
        return {k: full[k] for k in MANIFEST_KEYS}

    return {
        "checkpoint": {
            "path": str(ck.path),
            "files": file_manifest(Path(ck.path)),
            "config": ck.config.__dict__,
        },
        "baseline_checkpoint": str(result.options.baseline.path) if result.options.baseline else None,
        "eval_text": text_source(result.options.eval_text),  # what perplexity and KL were measured on
        "tools": tool_versions(),
        "artifacts": [entry(a) for a in result.artifacts],
        "baseline": [entry(a) for a in result.baseline],
    }


def write(result, root: Path) -> dict:
    """manifest.json, report.json, plots/ and report.md of a pipeline run (a pipeline.RunResult) into root."""
    root = Path(root)
    man = manifest(result)
    (root / "manifest.json").write_text(json.dumps(man, indent=2, default=float))
    rep = report_json(result, man)
    (root / "report.json").write_text(json.dumps(rep, indent=2, default=float))
    plots(result, root)
    (root / "report.md").write_text(report_md(result, rep))
    return rep

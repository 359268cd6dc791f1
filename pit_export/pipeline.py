"""The one-command pipeline: for each target, fold -> quantize -> export -> validate, then the report.

Output folder (built in a temporary sibling, renamed into place at the end; an existing one is replaced only with
force):

    OUT/manifest.json    checkpoint hash, config, tools, per-artifact files (sha256, bytes), scheme, layout, gates
    OUT/report.md        for people; OUT/report.json for CI; OUT/plots/*.png
    OUT/<target>/        one artifact folder per target (its own pit_export.json is what the runtimes read)
    OUT/baseline/<target>/  the same presets applied to a tied baseline checkpoint, for the size comparison

An artifact that fails its gates is left out (kept only with keep_failed) and the run ends with GateFailed after the
report is written: the report says which metric of which artifact missed by how much.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pit_export.errors import BadInput, GateFailed, Unavailable
from pit_export.export import TARGETS, export_artifact
from pit_export.fold import fold
from pit_export.models.checkpoint import Checkpoint, atomic_dir
from pit_export.validate import ValidateConfig, ValidationResult, Validator

ALL = "all"
BASELINE = "baseline"


@dataclass
class PipelineOptions:
    scheme: str | None = None  # None: each target's preset (with its fallback)
    layout: str | None = None
    embedding_bits: int | None = None
    gates: dict | None = None  # full gate table (validate.load_gates); None: the defaults
    n_windows: int = 8
    n_greedy: int = 64
    eval_text: str | None = None  # a plain-text file scored instead of the held-out split
    threads: int = 2
    keep_failed: bool = False
    force: bool = False
    validate: bool = True  # False: export only (status "unvalidated"; `pit-export validate` can check later)
    baseline: Checkpoint | None = None  # tied checkpoint exported with the same presets, for the size comparison
    rounding: str | None = None  # quantize.ROUNDINGS; None: the preset's for its schemes (rtn for an explicit scheme)


@dataclass
class ArtifactResult:
    target: str
    folder: str  # relative to OUT
    status: str  # passed | failed | unavailable | unvalidated
    scheme: str | None = None
    layout: str | None = None
    manifest: dict = field(default_factory=dict)  # the artifact's pit_export.json
    validation: ValidationResult | None = None
    note: str = ""
    rejected: list[dict] = field(default_factory=list)  # earlier attempts (scheme, failed gates) before a fallback

    @property
    def files(self) -> dict[str, dict]:
        return self.manifest.get("files", {})

    @property
    def bytes(self) -> int:
        """Deployed size: the files an app ships (the folder also holds probes, tokenizer, alternative formats)."""
        ship = self.manifest.get("deploy_files") or list(self.files)
        return sum(self.files[f]["bytes"] for f in ship if f in self.files)


@dataclass
class RunResult:
    out: Path
    checkpoint: Checkpoint
    artifacts: list[ArtifactResult]
    baseline: list[ArtifactResult]
    options: PipelineOptions

    @property
    def failed(self) -> list[ArtifactResult]:
        return [a for a in self.artifacts if a.status == "failed"]


def parse_targets(spec: str) -> list[str]:
    names = list(TARGETS) if spec == ALL else [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise BadInput(f"unknown target {', '.join(bad) or spec!r} (choose from {', '.join(TARGETS)}, or {ALL})")
    return names


def check_options(opts: PipelineOptions) -> None:
    """Names are checked before any work starts."""
    from pit_export.fold import LAYOUTS
    from pit_export.quantize import check_rounding, get_scheme

    check_rounding(opts.rounding)
    if opts.scheme is not None:
        get_scheme(opts.scheme)
    if opts.layout is not None and opts.layout not in LAYOUTS:
        raise BadInput(f"unknown layout {opts.layout!r} (choose from {', '.join(LAYOUTS)})")
    if opts.embedding_bits not in (None, 0, 4, 8):
        raise BadInput(f"embedding bits must be 0 (float), 4 or 8, got {opts.embedding_bits}")


def baseline_layout(layout: str, tying: str) -> str:
    """The tied model's counterpart of a PIT layout: its one shared table is E itself (shared-e)."""
    return "shared-e" if tying == "tied" and layout == "shared-z" else layout


def run(
    ckpt: Checkpoint,
    targets: list[str],
    out: Path,
    opts: PipelineOptions,
    progress: Callable[[str, str], None] = lambda target, msg: None,
    skip_unavailable: bool = False,
    release_source: bool = False,
) -> RunResult:
    """Export, validate and report every target into `out`; see gate_error() for the verdict.

    `release_source`: the caller is done with `ckpt` afterwards, so an unvalidated run may drop its model after the
    last fold (the CLI, for peak memory at scale)."""
    from pit_export import report

    out = Path(out)
    check_options(opts)
    result = RunResult(out, ckpt, [], [], opts)

    vcfg = ValidateConfig(n_windows=opts.n_windows, n_greedy=opts.n_greedy, eval_text=opts.eval_text)

    def write(tmp: Path):
        # one reference recording per checkpoint and run, shared by every target and every fallback attempt
        with Validator(ckpt, vcfg, opts.threads, opts.gates) as v:
            for i, t in enumerate(targets):
                # unvalidated, the last export is the checkpoint's last use (a baseline export reads its own checkpoint)
                last = release_source and not opts.validate and i == len(targets) - 1
                result.artifacts.append(_one_target(ckpt, t, tmp, t, opts, progress, skip_unavailable, v, last))
        if opts.baseline is not None:
            with Validator(opts.baseline, vcfg, opts.threads, opts.gates) as v:
                for a in result.artifacts:
                    if a.status == "unavailable":
                        continue
                    layout = baseline_layout(a.layout, opts.baseline.config.tying)
                    base = PipelineOptions(**{**opts.__dict__, "scheme": a.scheme.split("+")[0], "layout": layout})
                    base.rounding = a.manifest.get("rounding")  # the same rounding as the PIT artifact
                    base.embedding_bits = a.manifest.get("embedding_bits")
                    rel = f"{BASELINE}/{a.target}"
                    result.baseline.append(_one_target(opts.baseline, a.target, tmp, rel, base, progress, True, v))
        progress("report", "writing report")
        report.write(result, tmp)

    inputs = (ckpt.path, opts.baseline.path if opts.baseline is not None else None)
    atomic_dir(out, write, opts.force, inputs)
    return result


def gate_error(result: RunResult) -> GateFailed | None:
    """The exit-3 error for a run whose artifacts failed: which artifact, which metric, by how much."""
    from pit_export.report import failure_text

    if not result.failed:
        return None
    return GateFailed(
        "gate failed: "
        + "; ".join(f"{a.target}: {failure_text(g)}" for a in result.failed for g in a.validation.failures())
        + f" (report: {result.out / 'report.md'})"
    )


def _one_target(
    ckpt,
    target,
    root: Path,
    rel: str,
    opts: PipelineOptions,
    progress,
    skip_unavailable,
    validator: Validator,
    last=False,
):
    preset = TARGETS[target]
    schemes = [opts.scheme] if opts.scheme is not None else [preset.scheme, *preset.fallbacks]
    # the preset's embedding quantization goes with the preset's schemes; an explicit --scheme stands alone
    emb_bits = (
        opts.embedding_bits if opts.embedding_bits is not None else (None if opts.scheme else preset.embedding_bits)
    )
    emb_bits = emb_bits or None  # 0: float table
    # one fold per layout and run: fallback attempts reuse it (an unvalidated run has no fallbacks)
    folded = fold(ckpt, opts.layout or preset.layout) if opts.validate and len(schemes) > 1 else None
    res = ArtifactResult(target, rel, "failed")
    folder = root / rel
    for i, scheme in enumerate(schemes):
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        checked: list[ValidationResult] = []

        def check(tmp: Path, scheme=scheme, checked=checked) -> dict:
            from pit_export.runtimes import open_session

            progress(rel, "validate")
            validator.record()  # before the artifact is opened: the reference model and the artifact not side by side
            sess = open_session(tmp, threads=opts.threads)
            try:
                r = validator.check(sess, getattr(sess, "scheme", scheme))
            finally:
                sess.close()
            checked.append(r)
            return r.to_dict()

        try:
            manifest = export_artifact(
                ckpt,
                target,
                folder,
                scheme,
                opts.layout,
                emb_bits,
                lambda msg: progress(rel, msg),
                check if opts.validate else None,
                release_source=last,
                folded=folded,
                rounding=opts.rounding or (None if opts.scheme else preset.rounding),
            )
        except Unavailable as e:
            if not skip_unavailable:
                raise
            return ArtifactResult(target, rel, "unavailable", note=str(e))
        if not checked:
            return ArtifactResult(target, rel, "unvalidated", manifest["scheme"], manifest["layout"], manifest)
        v = checked[0]
        res = ArtifactResult(
            target,
            rel,
            "passed" if v.passed else "failed",
            manifest["scheme"],
            manifest["layout"],
            manifest,
            v,
            note=res.note,
            rejected=res.rejected,
        )
        if v.passed:
            break
        res.rejected.append({"scheme": manifest["scheme"], "failures": [g.__dict__ for g in v.failures()]})
        if i + 1 < len(schemes):
            res.note = f"{manifest['scheme']} failed its gates; fell back to {schemes[i + 1]}"
    if res.status == "failed" and not opts.keep_failed:
        shutil.rmtree(folder, ignore_errors=True)
        res.note = (res.note + "; " if res.note else "") + "artifact not written (failed its gates)"
    return res

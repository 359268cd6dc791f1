"""Targets and the export driver: fold -> backend export -> manifest, written atomically.

A backend module `pit_export.export.<backend>` provides

    export(fw: FoldedWeights, scheme: Scheme, out: Path, ckpt: Checkpoint, progress) -> dict

which writes its files into `out` (a temporary folder) and returns extra metadata for pit_export.json, including
"deploy_files": the files an app ships (their total is the artifact size the reports compare).
The matching Session lives in `pit_export.runtimes.<module>` and is registered under the same backend name.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import platform
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from pit_export.decoder import FoldedWeights
from pit_export.errors import BadInput, Unavailable
from pit_export.fold import fold
from pit_export.memory import release_file_pages, release_memory
from pit_export.models.checkpoint import CONFIG, MARKER, TOKENIZER, WEIGHTS, Checkpoint, atomic_dir, file_sha256
from pit_export.quantize import get_scheme, has_4bit, recipe, rounding_name

META = "pit_export.json"


@dataclass(frozen=True)
class Target:
    name: str
    backend: str
    scheme: str  # default quantization scheme
    layout: str  # default PIT layout
    description: str
    embedding_bits: int | None = None  # default gather-table quantization
    fallbacks: tuple[str, ...] = ()  # schemes the pipeline tries, in order, when the default fails its gates
    rounding: str = "rtn"  # quantize.ROUNDINGS: how the preset's 4-bit schemes round (not an explicit --scheme)


# Presets; the README's "Target presets" table gives the measurements behind each choice.
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "android",
            "executorch",
            "8da4w",
            "untied",
            "ExecuTorch .pte lowered to XNNPACK (Android / ARM CPUs)",
            embedding_bits=4,
            fallbacks=("int8",),
            rounding="gptq-all",  # docs/measurements.md, "Calibrated rounding"
        ),
        Target(
            "onnx-cpu",
            "onnx",
            "8da4w",  # int4 weights with int8 compute (accuracy_level 4): the int4 file, faster, same perplexity
            "shared-z",
            "ONNX Runtime CPU / mobile, onnxruntime-genai folder",
            fallbacks=("int4", "int8"),
            rounding="gptq-all",
        ),
        Target(
            "ios",
            "coreml",
            "int4",
            "shared-z",
            "CoreML .mlpackage (iOS 18+), fp16 compute, KV cache as state",
            fallbacks=("int8",),
            rounding="gptq-all",
        ),
    )
}

TOOL_PACKAGES = ("torch", "executorch", "torchao", "onnx", "onnxruntime", "onnxruntime-genai", "coremltools")


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in TOOL_PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def file_manifest(folder: Path) -> dict[str, dict]:
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (META, MARKER)):
        files[f.relative_to(folder).as_posix()] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
    return files


def export_artifact(
    ckpt: Checkpoint,
    target: str,
    out: Path,
    scheme: str | None = None,
    layout: str | None = None,
    embedding_bits: int | None = None,
    progress=lambda msg: None,
    check=None,
    release_source: bool = False,
    folded=None,
    rounding: str | None = None,
) -> dict:
    """Fold, export and write pit_export.json; returns the manifest.

    `rounding` (quantize.ROUNDINGS): None = the scheme name's suffix if any, else the target preset's when the scheme
    is the preset's own (scheme None); a preset's calibrated rounding is dropped for a scheme without 4-bit weights.
    `check(folder) -> dict` runs on the finished temporary folder (validation); its result lands in the manifest.
    If it raises (a failed gate), nothing is written: `out` appears only complete and checked.
    `folded`: (FoldedWeights, FoldReport) of this checkpoint and layout from an earlier attempt, reused instead of
    folding again (the backends read the tensors and never change them; they release only their own dict).
    `release_source`: the checkpoint's model is not needed afterwards (no check, no other export): it is dropped once
    folded, and the backend frees the folded tensors once its files hold them (peak memory at scale)."""
    if target not in TARGETS:
        raise BadInput(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    t = TARGETS[target]
    sch = get_scheme(scheme or t.scheme, embedding_bits)
    # -- rounding (calibrate.py): explicit, else the preset's for its own scheme
    if rounding is None and scheme is None:
        rounding = t.rounding
    if rounding is not None and (rounding == "rtn" or has_4bit(sch)):
        sch = get_scheme(sch.name, embedding_bits, rounding)
    layout = layout or t.layout
    recipe(sch, t.backend)  # BadInput where this backend does not implement the scheme (quantize.RECIPES)
    if importlib.util.find_spec(f"{__name__}.{t.backend}") is None:
        raise Unavailable(f"target {target}: the {t.backend} exporter is not part of this build")
    try:
        backend = importlib.import_module(f"{__name__}.{t.backend}")
    except ImportError as e:  # its toolchain is missing here
        raise Unavailable(f"target {target}: {t.backend} toolchain unavailable ({e})") from None
    reused = folded is not None and folded[0].layout == layout
    if reused:  # a fold of this run, shared by its attempts
        base, fold_report = folded
        fw = FoldedWeights(base.cfg, base.layout, dict(base.tensors), dict(base.meta))  # release() clears the copy
    else:
        progress(f"fold ({layout})")
        fw, fold_report = fold(ckpt, layout)
    # -- calibrated rounding (pit_export/calibrate.py): the weights arrive on the backend's grid, which its own
    # quantizer then reproduces
    calibration = None
    if sch.calibration is not None:
        from pit_export import calibrate

        progress(f"calibrate ({sch.calibration}): GPTQ on training-split text")
        # the originals' file pages are given back as each weight is rounded (clean: re-read if needed again)
        mapped = str(ckpt.path / WEIGHTS)
        # a fold of this export alone: its tables may be rounded in place
        fw, calibration = calibrate.apply(
            fw, ckpt.model, ckpt.tokenizer, sch, t.backend, mapped=mapped, inplace=not reused
        )
    # -- end calibrated rounding
    if getattr(ckpt, "path", None) is not None and ckpt.model is not None:
        # the checkpoint pages fold read and no folded weight shares go back now (clean: the model reads them again
        # from the file if it runs later); those it shares go back when the backend releases fw
        fw.mapped = str(ckpt.path / WEIGHTS)
        dead = list(ckpt.model.state_dict().values())
        if release_source:
            ckpt.model = None
        release_file_pages(fw.mapped, dead, fw.tensors.values())
        del dead
    release_memory()  # the fold report's float64 chunks
    manifest: dict = {}

    def write(tmp: Path):
        # fw is single-use: a backend may release() it
        extra = backend.export(fw, sch, tmp, ckpt, progress)
        ckpt.tokenizer.save(str(tmp / TOKENIZER))
        (tmp / CONFIG).write_text(ckpt.config.to_json())
        manifest.update(
            {
                "backend": t.backend,
                "target": target,
                "scheme": sch.name,
                "layout": layout,
                "embedding_bits": sch.embedding_bits,
                "rounding": rounding_name(sch),
                **({"calibration": calibration} if calibration is not None else {}),
                "source": {"path": str(ckpt.path), "sha256": file_sha256(ckpt.path / WEIGHTS)},
                "fold_report": asdict(fold_report),
                "tools": tool_versions(),
                **extra,
            }
        )
        manifest["files"] = file_manifest(tmp)
        (tmp / META).write_text(json.dumps(manifest, indent=2))
        if check is not None:
            manifest["validation"] = check(tmp)
            (tmp / META).write_text(json.dumps(manifest, indent=2))

    atomic_dir(out, write)
    return manifest

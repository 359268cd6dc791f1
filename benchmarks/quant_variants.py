"""Rounding variants of the 4-bit presets, PIT and tied alike: size, parity and export time per variant.

    .venv/bin/python benchmarks/quant_variants.py [--targets onnx-cpu,ios,android] [--windows 16] [--out DIR]

Each variant is an option of an existing scheme (round to nearest, or GPTQ on the backend's grid for the V x d tables
or for every 4-bit weight: pit_export/calibrate.py), exported through the real backend and validated through its
runtime against the training graph on held-out windows (calibration reads the training split only). Writes
DIR/quant-variants.json, keeping the rows of the targets not run; benchmarks/render.py renders it."""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from pit_export.models.checkpoint import load_checkpoint
from pit_export.models.train import heldout_windows
from pit_export.runtimes import open_session
from pit_export.runtimes.pytorch import ReferenceSession

from pit_export.export import export_artifact
from pit_export.validate import ValidateConfig, validate

# target -> base scheme, and per PIT layout (embedding bits, roundings); the tied baseline takes the compact
# counterpart (shared-e) of shared-z with the same variants, and untied stays untied
ALL = ("rtn", "gptq", "gptq-all")
TARGETS = {
    "onnx-cpu": ("8da4w", {"shared-z": (None, ALL), "untied": (4, ("rtn", "gptq-all"))}),
    "ios": ("int4", {"shared-z": (None, ALL), "untied": (None, ("rtn", "gptq-all"))}),
    "android": ("8da4w", {"untied": (4, ALL), "shared-z": (4, ("rtn", "gptq-all"))}),
}
COLS = [
    "ppl_ratio",
    "kl_mean",
    "kl_p99",
    "top1",
    "max_abs_logit",
    "interface_err_max",
    "interface_err_fro",
    "round_trip_max_abs",
    "round_trip_argmax",
    "greedy_agree",
]


def deployed_bytes(man: dict) -> int:
    if "onnx" in man:
        return man["onnx"]["model_bytes"]
    if "coreml" in man:
        return sum(v["bytes"] for f, v in man["files"].items() if f.startswith(man["coreml"]["package"] + "/"))
    et = man["executorch"]
    return sum(man["files"][f]["bytes"] for f in (et["program"], et["data"]) if f)


def run(model_dir: Path, tmp: Path, target: str, n_windows: int, only=None, only_layouts=None) -> list[dict]:
    ckpt = load_checkpoint(model_dir)
    held = np.asarray(heldout_windows(ckpt.tokenizer, ckpt.config))
    ref = ReferenceSession(ckpt.model, threads=2)
    scheme, layouts = TARGETS[target]
    if ckpt.config.tying == "tied":
        layouts = {"shared-e" if k == "shared-z" else k: (e, ALL) for k, (e, _r) in layouts.items()}
    rows = []
    for layout, (emb, roundings) in layouts.items():
        if only_layouts and layout not in only_layouts:
            continue
        for rounding in (r for r in roundings if only is None or r in only):
            out = tmp / f"{model_dir.name}-{target}-{layout}-{rounding}"
            t0 = time.perf_counter()
            suffix = "" if rounding == "rtn" else f"+{rounding}"
            man = export_artifact(ckpt, target, out, scheme + suffix, layout, emb)
            wall = time.perf_counter() - t0
            sess = open_session(out, threads=2)
            res = validate(ref, sess, held, sess.scheme, ValidateConfig(n_windows=n_windows))
            sess.close()
            cal = man.get("calibration") or {}
            rows.append(
                {
                    "model": model_dir.name,
                    "tying": ckpt.config.tying,
                    "target": target,
                    "layout": layout,
                    "scheme": man["scheme"],
                    "rounding": rounding,
                    "windows": n_windows,
                    "model_bytes": deployed_bytes(man),
                    "export_wall_s": round(wall, 1),
                    "calibration_s": cal.get("seconds"),
                    "off_grid": sum(w["off_grid"] for w in cal.get("weights", {}).values()) if cal else None,
                    "passed": res.passed,
                    "load_avg": os.getloadavg()[0],
                    **{k: res.metrics[k] for k in COLS},
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    ref.close()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="onnx-cpu,ios,android")
    ap.add_argument("--models", nargs="+", type=Path, default=[Path("models/pit-tiny"), Path("models/tied-tiny")])
    ap.add_argument("--windows", type=int, default=16, help="held-out windows scored per artifact")
    ap.add_argument("--roundings", help="only these roundings (rtn, gptq, gptq-all); default: the variants above")
    ap.add_argument("--layouts", help="only these layouts (comma-separated)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    only = set(args.roundings.split(",")) if args.roundings else None
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets.split(","):
            for m in args.models:
                rows += run(m, Path(tmp), target, args.windows, only, args.layouts and args.layouts.split(","))
                partial = {"windows": args.windows, "rows": rows}
                (args.out / "quant-variants.partial.json").write_text(json.dumps(partial, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    done = set(args.targets.split(","))
    old = args.out / "quant-variants.json"
    kept = [r for r in json.loads(old.read_text())["rows"] if r["target"] not in done] if old.is_file() else []
    doc = {
        "machine": {"host": platform.machine(), "cpus": os.cpu_count(), "note": "shared 2-core x86-64 host"},
        "rows": kept + rows,  # the targets not run this time keep their rows (each row says its windows)
    }
    (args.out / "quant-variants.json").write_text(json.dumps(doc, indent=2))
    (args.out / "quant-variants.partial.json").unlink(missing_ok=True)  # rows kept while the run was going


if __name__ == "__main__":
    main()

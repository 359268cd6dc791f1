"""Artifact report per target: size, parity and export time for every scheme x layout, PIT and the tied baseline.

    .venv/bin/python benchmarks/artifacts.py --target onnx-cpu|android|ios [--models ...] [--out DIR]

Writes DIR/<target>.json and prints a markdown table. Greedy agreement is against the training graph (64 tokens);
for onnx-cpu, genai agreement is onnxruntime-genai's greedy tokens against our ORT session's on the same artifact."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from pit_export.models.checkpoint import load_checkpoint
from pit_export.models.train import heldout_windows
from pit_export.runtimes import greedy_generate, open_session
from pit_export.runtimes.genai import genai_greedy
from pit_export.runtimes.pytorch import ReferenceSession

from pit_export.export import export_artifact
from pit_export.fold import layouts_for
from pit_export.validate import validate

COMBOS = {
    "onnx-cpu": [("fp32", None), ("int8", None), ("int4", None), ("int4", 4)],
    "android": [("fp32", None), ("int8", None), ("8da4w", None), ("8da4w", 4)],
    "ios": [("fp32", None), ("fp16", None), ("int8", None), ("int4", None), ("palettize4", None)],
}
COLS = ["max_abs_logit", "top1", "kl_mean", "kl_p99", "ppl_ratio", "interface_err_max", "greedy_agree"]


def deployed_bytes(man: dict) -> int:
    """The files a phone needs: the model graph(s) and weights, not probes, tokenizer or the .ort duplicate."""
    if "onnx" in man:
        return man["onnx"]["model_bytes"]
    if "coreml" in man:  # the whole .mlpackage: program, weight.bin, manifest
        return sum(v["bytes"] for f, v in man["files"].items() if f.startswith(man["coreml"]["package"] + "/"))
    et = man["executorch"]
    return sum(man["files"][f]["bytes"] for f in (et["program"], et["data"]) if f)


def run(model_dir: Path, tmp: Path, target: str, layouts: tuple[str, ...] | None = None) -> list[dict]:
    ckpt = load_checkpoint(model_dir)
    held = np.asarray(heldout_windows(ckpt.tokenizer, ckpt.config))
    ref = ReferenceSession(ckpt.model, threads=2)
    prompt = held[-1, :32].tolist()
    rows = []
    for layout in (x for x in layouts_for(ckpt.config.tying) if layouts is None or x in layouts):
        for scheme, emb in COMBOS[target]:
            if emb and layout != "untied":
                continue  # compact layouts already share one table in the head's precision
            out = tmp / f"{model_dir.name}-{layout}-{scheme}-{emb}"
            t0 = time.perf_counter()
            man = export_artifact(ckpt, target, out, scheme, layout, emb)
            wall = time.perf_counter() - t0
            sess = open_session(out, threads=2)
            res = validate(ref, sess, held, sess.scheme)
            genai = genai_greedy(out, prompt, 64) == greedy_generate(sess, prompt, 64) if "onnx" in man else None
            rows.append(
                {
                    "model": model_dir.name,
                    "layout": layout,
                    "scheme": man["scheme"],
                    "model_bytes": deployed_bytes(man),
                    "export_wall_s": round(wall, 1),
                    "passed": res.passed,
                    "genai_agree": genai,
                    **{k: res.metrics[k] for k in COLS},
                }
            )
            sess.close()
            print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = ["model", "layout", "scheme", "MB", "export s", *COLS, "genai", "gate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [r["model"], r["layout"], r["scheme"], f"{r['model_bytes'] / 1e6:.3f}"]
        vals += [f"{r['export_wall_s']:.1f}"] + [f"{r[k]:.5g}" for k in COLS]
        vals += [{None: "-", True: "same", False: "DIFF"}[r["genai_agree"]], "pass" if r["passed"] else "FAIL"]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", choices=sorted(COMBOS), default="onnx-cpu")
    ap.add_argument("--models", nargs="+", type=Path, default=[Path("models/pit-tiny"), Path("models/tied-tiny")])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--layouts", help="Only these layouts (comma-separated); default: every layout of each model.")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.models:
            if (m / "model.safetensors").exists():
                rows += run(m, Path(tmp), args.target, args.layouts and tuple(args.layouts.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.target}.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()

"""Scale run on the family where PIT saves the most: a Qwen2.5-0.5B-shaped HF model (V 151 936, d 896, 24 layers,
14 heads, 2 KV heads, q/k/v biases, tied; random init built with transformers, fp32 ~2 GB) through import-hf ->
export onnx-cpu and android with their presets, onnx-cpu at fp32 with validation, and onnx-cpu's preset scheme in the
untied layout (rounded to nearest: the size is the same); beside it the onnxruntime-genai builder's export of the
tied teacher at int4 (its venv from `make peers`).

    .venv/bin/python benchmarks/scale_qwen.py [--work DIR] [--out benchmarks/results/scale-qwen2.5-0.5b.json]

Each stage is the real CLI in its own process (benchmarks/scale.py's run_stage: wall time, peak memory of the process
tree); the budget is 3x the fp32 checkpoint. Deployed sizes are the files a runtime needs (graph + weights)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peers import OFFLINE, deployed, venv_python  # noqa: E402
from benchmarks.scale import CLI, build_tokenizer, run_stage  # noqa: E402

QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=1,
)


def build_hf(dest: Path, tokenizer: Path) -> None:
    import shutil

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**QWEN25_05B, architectures=["Qwen2ForCausalLM"])
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(dest)
    shutil.copy(tokenizer, dest / "tokenizer.json")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / ".scale" / "qwen2.5-0.5b")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale-qwen2.5-0.5b.json")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--only", default=None, help="Comma-separated stage names; the others are kept from --out.")
    a = ap.parse_args(argv)
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    hf, pit, ex = work / "hf", work / "pit", work / "exports"
    t0 = time.perf_counter()
    if not (hf / "config.json").is_file():
        tok = build_tokenizer(QWEN25_05B["vocab_size"], work / "tokenizer.json")
        build_hf(hf, tok)
    setup_s = time.perf_counter() - t0
    ckpt_bytes = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    ctx, nv = str(a.max_seq_len), ["--no-validate", "--force", "--json"]
    builder = [venv_python("onnxruntime-genai"), "-m", "onnxruntime_genai.models.builder"]
    stages = [
        ("import-hf", CLI, ["import-hf", hf, "--out", pit, "--init", "output", "--max-seq-len", ctx, "--json"], None),
        ("export onnx-cpu", CLI, ["export", pit, "--target", "onnx-cpu", "--out", ex / "onnx", *nv], None),
        ("export android", CLI, ["export", pit, "--target", "android", "--out", ex / "android", *nv], None),
        (
            "export onnx-cpu fp32 + validate",
            CLI,
            [
                "export",
                pit,
                "--target",
                "onnx-cpu",
                "--scheme",
                "fp32",
                "--out",
                ex / "onnx-fp32",
                "--n-windows",
                "2",
                "--n-greedy",
                "16",
                "--force",
                "--json",
            ],
            None,
        ),  # fmt: skip
        (
            "export onnx-cpu untied",
            CLI,
            # for its size only, which does not depend on the rounding: round to nearest, no second calibration
            [
                "export",
                pit,
                "--target",
                "onnx-cpu",
                "--layout",
                "untied",
                "--rounding",
                "rtn",
                "--out",
                ex / "onnx-untied",
                *nv,
            ],
            None,
        ),
        (
            "builder int4 (tied teacher)",
            builder,
            ["-i", hf, "-o", ex / "genai", "-p", "int4", "-e", "cpu", "-c", ex / "genai-cache"],
            OFFLINE,
        ),
    ]
    only = set(a.only.split(",")) if a.only else None
    kept = {}
    if a.out.is_file():
        kept = {r["stage"]: r for r in json.loads(a.out.read_text()).get("stages", [])}
    records = []
    for name, cmd, args, env in stages:
        if only is not None and name not in only:
            if name in kept:
                records.append(kept[name])
            continue
        if cmd is builder and not Path(builder[0]).is_file():
            records.append({"stage": name, "rc": None, "skipped": "no onnxruntime-genai venv (make peers)"})
            continue
        records.append(run_stage(name, args, cmd, env))
    budget_mb = 3 * ckpt_bytes / 2**20
    folders = {
        "PIT compact (shared-z), onnx-cpu preset": ex / "onnx" / "onnx-cpu",
        "PIT untied, onnx-cpu preset scheme": ex / "onnx-untied" / "onnx-cpu",
        "builder int4, tied teacher": ex / "genai",
        "PIT android preset": ex / "android" / "android",
        "PIT onnx-cpu fp32": ex / "onnx-fp32" / "onnx-cpu",
    }
    sizes = {k: sum(deployed(p).values()) for k, p in folders.items() if p.exists()}
    fp32 = next((r for r in records if r["stage"].startswith("export onnx-cpu fp32") and "result" in r), None)
    report = {
        "model": "Qwen2.5-0.5B configuration, random init (transformers Qwen2ForCausalLM), tied",
        "config": json.loads((pit / "config.json").read_text()) if (pit / "config.json").is_file() else None,
        "hf_config": QWEN25_05B,
        "max_seq_len": a.max_seq_len,
        "fp32_checkpoint_mb": round(ckpt_bytes / 2**20, 1),
        "rss_budget_mb": round(budget_mb, 1),
        "setup_seconds": round(setup_s, 1),
        "stages": records,
        "within_budget": {r["stage"]: r["peak_mb"] <= budget_mb for r in records if "peak_mb" in r},
        "deployed_bytes": sizes,
        "pit_compact_over_builder": (
            round(sizes[k] / sizes[b], 4)
            if (k := "PIT compact (shared-z), onnx-cpu preset") in sizes
            and (b := "builder int4, tied teacher") in sizes
            else None
        ),
        "fp32_validation": fp32["result"] if fp32 else None,
        "host": {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {a.out}; budget {budget_mb:.0f} MB; sizes {sizes}")
    return 0 if all(r.get("rc") in (0, None) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Executed ARM64 instructions per prefill token and per decoded token, ours beside the peers, on the SmolLM2-135M
configuration that `make peers` builds (.peers/work/exports): every artifact runs in the emulated ARM64 root
(`make emu`) under the counting QEMU plugin, one thread, the same prompt ids, through the same runner per runtime
(benchmarks/peer_runner.py's sessions: the .pte's forward for both ExecuTorch programs, og.Generator for both
onnxruntime-genai folders). Counts do not depend on emulation speed or on the host's load.

    .venv/bin/python benchmarks/emu/count_peers.py [--prompt-len 32] [--decode-steps 4] [--only LABEL,...]

Writes benchmarks/results/peers-arm64.json and its .md (benchmarks/render.py). Artifacts not built yet are listed
as missing.

Two attribution variants of our onnx-cpu folder (VARIANTS) are derived by graph edits, with the same codes: gate/up
as two MatMulNBits without the Split (the builder's layout), and the graph without PIT's two d x d transforms (not a
valid model: it shows what the rest of the graph costs beside the builder's)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

from pit_export.runtimes.timing import prompt_tokens  # noqa: E402

from pit_export import emu  # noqa: E402

EX = ROOT / ".peers" / "work" / "exports"
GUEST = Path(__file__).resolve().parent / "peer_count.py"
RESULTS = ROOT / "benchmarks" / "results"
# label -> (kind, path, data, what it is; the embedding scheme named)
ARTIFACTS = {
    "ours android": (
        "pte",
        EX / "ours-android/android/model.pte",
        None,
        "pit-export android preset: 8da4w linears, 4-bit embedding table (group 32), untied 8da4w head",
    ),
    "optimum-executorch": (
        "pte",
        EX / "optimum-executorch/model.pte",
        None,
        "optimum-executorch 1.1.0: 8da4w linears (--qlinear 8da4w), 8-bit embedding (--qembedding "
        "8w), the tied head quantized separately as an 8da4w linear",
    ),
    "ours onnx-cpu": (
        "genai",
        EX / "ours-onnx/onnx-cpu",
        None,
        "pit-export onnx-cpu preset: 8da4w (MatMulNBits int4, symmetric, accuracy_level 4: int8 activations), "
        "shared-z; the 4-bit GatherBlockQuantized embedding table shared with the head",
    ),
    "onnxruntime-genai": (
        "genai",
        EX / "genai",
        None,
        "onnxruntime-genai 0.18.0 builder -p int4: MatMulNBits (block 32, accuracy_level 4), "
        "GroupQueryAttention, one 4-bit GatherBlockQuantized table shared with the head",
    ),
    "onnxruntime-genai pruned head": (
        "genai",
        EX / "genai-pruned",
        None,
        "the same builder export with --extra_options prune_lm_head=true (not its default): the head on the last "
        "prompt position only, as ours by default",
    ),
}
PAIRS = [
    ("executorch", "ours android", "optimum-executorch"),
    ("onnx", "ours onnx-cpu", "onnxruntime-genai"),
    ("onnx, both heads pruned", "ours onnx-cpu", "onnxruntime-genai pruned head"),
]
VARIANTS = {
    "ours onnx-cpu (gate/up unpacked)": (
        "unpacked",
        "our preset folder with each packed gate/up MatMulNBits split into two (same codes) and no Split node",
    ),
    "ours onnx-cpu (no d x d transforms)": (
        "no_transforms",
        "our preset folder without embed_proj and head_proj (not a valid model: attribution only)",
    ),
}


def derive(kind: str, src: Path, dst: Path) -> None:
    """A variant of our onnx-cpu folder `src` in `dst` (VARIANTS), its weights the same bytes."""
    import shutil

    import onnx
    from onnx import helper, numpy_helper

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.onnx*", "model.ort"))
    m = onnx.load(src / "model.onnx")
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    nodes = []
    for n in g.node:
        if kind == "unpacked" and n.op_type == "Split":  # MatMulNBits [x -> gate | up] + Split -> two MatMulNBits
            mm = producer[n.input[0]]
            attrs = {a.name: helper.get_attribute_value(a) for a in mm.attribute}
            half = attrs["N"] // 2
            q, sc = (numpy_helper.to_array(inits[x]) for x in mm.input[1:3])
            for part, rows, out in (("gate", slice(0, half), n.output[0]), ("up", slice(half, None), n.output[1])):
                names = [f"{mm.input[1]}_{part}", f"{mm.input[2]}_{part}"]
                parts = zip((q, sc), names, strict=True)
                g.initializer.extend(numpy_helper.from_array(a[rows].copy(), k) for a, k in parts)
                nodes.append(
                    helper.make_node(
                        "MatMulNBits", [mm.input[0], *names], [out], f"{mm.name}_{part}", domain=mm.domain,
                        **{**attrs, "N": half},
                    )
                )  # fmt: skip
            nodes.remove(mm)
        elif kind == "no_transforms" and n.name.startswith(("embed/embed_proj/", "head/head_proj/")):
            for c in g.node:  # readers of its output read its input
                c.input[:] = [n.input[0] if x == n.output[0] else x for x in c.input]
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    used = {x for n in g.node for x in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    onnx.save_model(m, dst / "model.onnx", save_as_external_data=True, location="model.onnx.data", size_threshold=1024)


def count(kind: str, path: Path, data, vocab: int, prompt, gen: int) -> int:
    r = emu.root("executorch" if kind == "pte" else "onnx")
    args = {"kind": kind, "path": str(path), "data": data, "vocab": vocab, "prompt": prompt.tolist(), "gen": gen}
    cmd = [emu.QEMU_PLUGGABLE, "-plugin", str(emu.PLUGIN), "-L", str(r), str(r / "usr/bin/python3.11"), str(GUEST)]
    p = subprocess.run([*cmd, json.dumps(args)], capture_output=True, text=True, env=emu.guest_env(), timeout=14400)
    m = re.search(r"insns: (\d+)", p.stderr)
    if p.returncode != 0 or m is None:
        raise RuntimeError((p.stderr.strip().splitlines() or ["no output"])[-1])
    return int(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--decode-steps", type=int, default=4)
    ap.add_argument("--only", default="")
    ap.add_argument("--out", type=Path, default=RESULTS / "peers-arm64.json")
    a = ap.parse_args()
    why = emu.qemu_plugins()
    if why:
        sys.exit(why)
    vocab = json.loads((ROOT / ".peers/work/hf/config.json").read_text())["vocab_size"]
    prompt = prompt_tokens(a.prompt_len, vocab)
    old = json.loads(a.out.read_text()) if a.out.is_file() else {}
    results = old.get("artifacts", {})
    only = [s for s in a.only.split(",") if s]
    ours = ARTIFACTS["ours onnx-cpu"][1]
    for label, (variant, _) in VARIANTS.items():
        if (not only or label in only) and ours.exists():
            derive(variant, ours, EX / "variants" / variant / "onnx-cpu")
    variants = {k: ("genai", EX / "variants" / v / "onnx-cpu", None, w) for k, (v, w) in VARIANTS.items()}
    for label, (kind, path, data, what) in {**ARTIFACTS, **variants}.items():
        if only and label not in only:
            continue
        if not path.exists():
            results[label] = {"missing": f"{path.relative_to(ROOT)} not built (make peers)", "what": what}
            continue
        counts, t0 = [], time.time()
        for n, gen in emu.count_plan(a.prompt_len, a.decode_steps):
            print(f"{label}: prompt {n}, {gen} decode steps ...", flush=True)
            counts.append(count(kind, path, data, vocab, prompt[:n], gen))
        res = emu.per_token(
            counts, a.prompt_len, a.decode_steps, "QEMU TCG plugin (benchmarks/emu/insn_count.c)", "arm64"
        )
        results[label] = res | {
            "what": what,
            "kind": kind,
            "path": str(path.relative_to(ROOT)),
            "wall_s": time.time() - t0,
            "loadavg_1m": os.getloadavg()[0],
        }
        print(label, {k: v for k, v in res.items() if k.endswith("_token")}, flush=True)
    ratios = {}
    for name, ours, peer in PAIRS:
        o, p = results.get(ours, {}), results.get(peer, {})
        if "arm64_instructions_per_decoded_token" in o and "arm64_instructions_per_decoded_token" in p:
            ratios[name] = {
                f"{k}_ours_over_peer": o[f"arm64_instructions_per_{k}_token"] / p[f"arm64_instructions_per_{k}_token"]
                for k in ("prefill", "decoded")
            }
    doc = {
        "what": "executed ARM64 instructions per token, emulated Cortex-A76 (QEMU user mode), one thread",
        "model": json.loads((ROOT / ".peers/work/hf/config.json").read_text()),
        "prompt_len": a.prompt_len,
        "decode_steps": a.decode_steps,
        "emulator": {"qemu": emu.QEMU_PLUGGABLE, "cpu": emu.QEMU_CPU} | emu.build_info(),
        "artifacts": results,
        "ratios": ratios,
    }
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    from benchmarks.render import render_file

    print(render_file(a.out)[0])


if __name__ == "__main__":
    main()

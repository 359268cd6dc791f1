"""pit-export side by side with its peers on the SmolLM2-135M configuration (random init, tied), offline.

    .venv/bin/python benchmarks/peers.py [--threads 1,2] [--prompt-lens 64,256] [--gen 64] [--repeats 5] [--rounds 3]

Peers: optimum-executorch (ExecuTorch .pte, XNNPACK, 8da4w + 8-bit embedding) and the onnxruntime-genai model
builder (ONNX, int4 MatMulNBits). Each peer gets its own venv under .peers/venvs (they need different transformers),
built here from pinned versions with torch held at the CPU wheel. The HF model (benchmarks/scale.py's SmolLM2-135M
configuration + tokenizer) is built locally; nothing else is downloaded, and the peers run with HF_HUB_OFFLINE=1.

Every export is one process: wall time and its peak RSS (os.wait4). Every artifact is then timed the same way:
fixed pseudo-random prompt ids, greedy with numpy's argmax over the last position's fp32 logits, one warm-up run,
medians over --repeats, a fresh process per (threads, prompt length). Ours through `pit-export bench`; the peers
through benchmarks/peer_runner.py in their own venv, which reuses runtimes/timing.py (the bench's timing loop).
Ours also goes through peer_runner.py in the peer's venv: same runner, same runtime build. The runner-timed artifacts
go one configuration at a time across all of them (ours and the peer back to back), --rounds times in turn, each
configuration's figure the median of its rounds, so the host's drift falls onto both sides of a ratio alike.
Stages are cached under --work; --only reruns named stages. Writes benchmarks/results/peers.json and prints tables."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.scale import SMOLLM2_135M, build_tokenizer, run_stage  # noqa: E402

PEERS_DIR = ROOT / ".peers"
RUNNER = ROOT / "benchmarks" / "peer_runner.py"
# Each peer's own stack, exact versions; torch, executorch, torchao, onnx* and numpy follow constraints.txt.
PEERS = {
    "optimum-executorch": [
        "optimum-executorch==1.1.0",
        "optimum==2.0.0",
        "transformers==5.0.0rc1",
        "executorch==1.5.1",
        "torchao==0.18.0",
        "pytorch-tokenizers==1.5.0",
        "accelerate==1.15.0",
    ],
    "onnxruntime-genai": [
        "onnxruntime-genai==0.18.0",
        "onnxruntime==1.32.0",
        "onnx==1.23.2",
        "onnx-ir==1.1.0",
        "transformers==5.23.0",
    ],
}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def venv_python(name: str) -> Path:
    return PEERS_DIR / "venvs" / name / "bin" / "python"


def ensure_venv(name: str) -> Path:
    """The peer's venv, rebuilt only when its pinned list changes. torch goes first, from the CPU wheel, and the
    project's constraints.txt holds it (and the shared export stack) for every later resolver step."""
    py, stamp = venv_python(name), PEERS_DIR / "venvs" / name / ".installed"
    want = "\n".join(PEERS[name])
    if stamp.is_file() and stamp.read_text() == want:
        return py
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(py.parents[1])], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "torch==2.13.0+cpu"], check=True)
    subprocess.run([*pip, "-c", str(ROOT / "constraints.txt"), *PEERS[name]], check=True)
    stamp.write_text(want)
    return py


def freeze(py: Path) -> dict:
    out = subprocess.run([str(py), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True).stdout
    return {p["name"]: p["version"] for p in json.loads(out or "[]")}


def build_hf(work: Path) -> Path:
    """scale.py's SmolLM2-135M configuration, random init, saved with save_pretrained, plus its tokenizer.json."""
    from tests.hf_models import save_hf

    hf = work / "hf"
    if not (hf / "config.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        save_hf(hf, SMOLLM2_135M, build_tokenizer(SMOLLM2_135M.vocab_size, work / "tokenizer.json"))
    return hf


def export_stages(work: Path, ctx: int) -> dict:
    """name -> (command prefix, args, env, artifact path). Ours without validation (see README): validation runs the
    artifact through its runtime against the training graph, which the peers' exports do not do."""
    hf, ex, cli = work / "hf", work / "exports", [sys.executable, "-m", "pit_export"]
    pit = ex / "ours-pit"
    oe = [venv_python("optimum-executorch").parent / "optimum-cli"]
    og = [venv_python("onnxruntime-genai"), "-m", "onnxruntime_genai.models.builder"]
    recipe = ["--recipe", "xnnpack", "--use_custom_sdpa", "--use_custom_kv_cache", "--qlinear", "8da4w"]
    ours = ["--no-validate", "--force", "--json"]
    return {
        "optimum-executorch": (
            oe,
            [
                "export",
                "executorch",
                "--model",
                hf,
                "--task",
                "text-generation",
                *recipe,
                "--qembedding",
                "8w",
                "--max_seq_len",
                ctx,
                "--output_dir",
                ex / "optimum-executorch",
            ],
            OFFLINE,
            ex / "optimum-executorch" / "model.pte",
        ),
        "optimum-executorch emb4": (
            oe,
            [
                "export",
                "executorch",
                "--model",
                hf,
                "--task",
                "text-generation",
                *recipe,
                "--qembedding",
                "4w",
                "--qembedding_group_size",
                32,
                "--max_seq_len",
                ctx,
                "--output_dir",
                ex / "optimum-executorch-emb4",
            ],
            OFFLINE,
            ex / "optimum-executorch-emb4" / "model.pte",
        ),
        "onnxruntime-genai": (
            og,
            ["-i", hf, "-o", ex / "genai", "-p", "int4", "-e", "cpu", "-c", ex / "genai-cache"],
            OFFLINE,
            ex / "genai",
        ),
        # the builder's own option for what our graph does by default: logits of the last prompt position only
        "onnxruntime-genai pruned head": (
            og,
            [
                "-i",
                hf,
                "-o",
                ex / "genai-pruned",
                "-p",
                "int4",
                "-e",
                "cpu",
                "-c",
                ex / "genai-cache",
                "--extra_options",
                "prune_lm_head=true",
            ],
            OFFLINE,
            ex / "genai-pruned",
        ),
        "ours import-hf": (
            cli,
            ["import-hf", hf, "--out", pit, "--init", "output", "--max-seq-len", ctx, "--json"],
            None,
            pit,
        ),
        "ours onnx-cpu": (
            cli,
            ["export", pit, "--target", "onnx-cpu", "--out", ex / "ours-onnx", *ours],
            None,
            ex / "ours-onnx" / "onnx-cpu",
        ),
        "ours android": (
            cli,
            ["export", pit, "--target", "android", "--out", ex / "ours-android", *ours],
            None,
            ex / "ours-android" / "android",
        ),
        "ours android emb8": (
            cli,
            ["export", pit, "--target", "android", "--embedding-bits", "8", "--out", ex / "ours-android-emb8", *ours],
            None,
            ex / "ours-android-emb8" / "android",
        ),
    }


def timed_artifacts(work: Path) -> dict:
    """What is timed. how "bench": `pit-export bench`; how "runner": peer_runner.py in the named venv (kind "worker":
    `pit-export bench`'s per-configuration worker in ours), timed configuration by configuration in turn with the
    others. Ours also goes through the peer's runner and runtime build (same code path as the peer: the cleanest
    comparison)."""
    ex = work / "exports"
    ours_a, ours_o = ex / "ours-android" / "android", ex / "ours-onnx" / "onnx-cpu"
    et, og = "optimum-executorch", "onnxruntime-genai"

    def bench(backend: str, path: Path, label: str) -> dict:
        return dict(backend=backend, how="bench", path=path, label=label)

    def pte(path: Path, label: str) -> dict:
        return dict(backend="executorch", how="runner", venv=et, kind="pte", path=path, label=label)

    def genai(path: Path, label: str, native: bool = False) -> dict:
        return dict(backend="onnx", how="runner", venv=og, kind="genai", path=path, label=label, native=native)

    return {
        "ours android": bench("executorch", ours_a, "pit-export android preset: 8da4w + 4-bit embedding, untied"),
        "ours android emb8": bench(
            "executorch",
            ex / "ours-android-emb8" / "android",
            "pit-export android: 8da4w + 8-bit embedding (group 32; optimum's 8w is per row), untied",
        ),
        et: pte(
            ex / et / "model.pte",
            "optimum-executorch 1.1.0: 8da4w + 8-bit embedding (per row), custom SDPA + KV cache",
        ),
        "optimum-executorch emb4": pte(
            ex / "optimum-executorch-emb4" / "model.pte",
            "optimum-executorch 1.1.0: 8da4w + 4-bit embedding (group 32: our preset's scheme)",
        ),
        "ours android (peer runner)": pte(ours_a / "model.pte", "ours android through peer_runner.py"),
        "ours onnx-cpu": bench(
            "onnx",
            ours_o,
            "pit-export onnx-cpu preset: 8da4w (int4 MatMulNBits, int8 compute), shared-z, fused graph "
            "(GroupQueryAttention, SkipSimplifiedLayerNormalization; ONNX Runtime session, KV bound in place)",
        ),
        "ours onnx-cpu (our session in turn)": dict(
            backend="onnx",
            how="runner",
            kind="worker",
            path=ours_o,
            label="ours onnx-cpu through our ORT session (`pit-export bench`'s worker), timed in turn with the runners",
        ),
        og: genai(ex / "genai", "onnxruntime-genai 0.18.0 builder: int4 MatMulNBits, GroupQueryAttention"),
        "ours onnx-cpu (genai runner)": genai(ours_o, "ours onnx-cpu loaded by onnxruntime-genai, peer_runner.py"),
        f"{og} (native search)": genai(ex / "genai", "genai's generate_next_token (argmax in C++)", native=True),
        "ours onnx-cpu (genai native search)": genai(ours_o, "ours in genai, generate_next_token", native=True),
        f"{og} pruned head (native search)": genai(
            ex / "genai-pruned",
            "the builder with prune_lm_head=true (not its default), generate_next_token",
            native=True,
        ),
    }


# (what is compared, ours, peer): ratios ours / peer
PAIRS = [
    ("executorch: presets", "ours android", "optimum-executorch"),
    ("executorch: both 8-bit embedding", "ours android emb8", "optimum-executorch"),
    ("executorch: both 4-bit embedding (group 32)", "ours android", "optimum-executorch emb4"),
    ("executorch: same runner", "ours android (peer runner)", "optimum-executorch"),
    ("onnx: presets (our ORT session vs genai)", "ours onnx-cpu", "onnxruntime-genai"),
    ("onnx: our ORT session vs genai, in turn", "ours onnx-cpu (our session in turn)", "onnxruntime-genai"),
    ("onnx: both in genai, same runner", "ours onnx-cpu (genai runner)", "onnxruntime-genai"),
    ("onnx: both in genai, native search", "ours onnx-cpu (genai native search)", "onnxruntime-genai (native search)"),
    (
        "onnx: native search, steps paired in one process",
        "ours onnx-cpu (paired steps)",
        "onnxruntime-genai (paired steps)",
    ),
    (
        "onnx: native search, both heads pruned",
        "ours onnx-cpu (genai native search)",
        "onnxruntime-genai pruned head (native search)",
    ),
]


def deployed(path: Path) -> dict:
    """The files the runtime needs to run the model (graph + weights; not tokenizer or configs), bytes each."""
    path = Path(path)
    if (path / "pit_export.json").is_file():
        names = json.loads((path / "pit_export.json").read_text())["deploy_files"]
    elif path.is_dir():  # genai folder: the ONNX graph and its external data
        names = sorted(f.name for f in path.iterdir() if f.suffix in (".onnx", ".data"))
    else:
        path, names = path.parent, [path.name]
    return {n: (path / n).stat().st_size for n in names}


def onnx_summary(folder: Path) -> dict:
    """What the ONNX graph asks of the runtime: node count, the commonest ops, MatMulNBits count and accuracy_level
    (4 = int8 activations in the 4-bit matmul, 0/absent = fp32)."""
    import collections

    import onnx

    g = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    ops = collections.Counter(n.op_type for n in g.node)
    acc = collections.Counter(
        next((a.i for a in n.attribute if a.name == "accuracy_level"), 0) for n in g.node if n.op_type == "MatMulNBits"
    )
    return {"nodes": len(g.node), "top_ops": dict(ops.most_common(10)), "matmulnbits_accuracy_level": dict(acc)}


def run_runner(spec: dict, vocab: int, threads: int, n: int, gen: int, repeats: int) -> dict:
    if spec["kind"] == "worker":  # our session: `pit-export bench`'s own worker, one configuration, in our venv
        from pit_export.bench import measure_in_subprocess, to_dicts
        from pit_export.errors import PitError

        try:
            return to_dicts([measure_in_subprocess(Path(spec["path"]), threads, n, gen, repeats)])[0]
        except PitError as e:
            return {"threads": threads, "prompt_len": n, "error": [str(e)]}
    args = dict(
        kind=spec["kind"],
        path=str(spec["path"]),
        vocab=vocab,
        threads=threads,
        prompt_len=n,
        gen=gen,
        repeats=repeats,
        native=spec.get("native", False),
        profile=spec.get("profile", False),
    )
    r = call_runner(spec["venv"], args)
    return {"threads": threads, "prompt_len": n} | r if "error" in r else r


def call_runner(venv: str, args: dict) -> dict:
    """peer_runner.py in the named venv with `args`: its JSON result, or {"error": the last lines of stderr}."""
    env = os.environ | OFFLINE | {"OMP_NUM_THREADS": str(args["threads"])}
    p = subprocess.run([str(venv_python(venv)), str(RUNNER), json.dumps(args)], capture_output=True, text=True, env=env)
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        return {"error": (p.stderr.strip().splitlines() or ["no output"])[-5:]}
    return json.loads(lines[-1])


def bench_one(key: str, spec: dict, work: Path, a) -> dict:
    rec = {"label": spec["label"], "backend": spec["backend"], "how": spec["how"], "path": str(spec["path"])}
    if not Path(spec["path"]).exists():
        return rec | {"error": f"{spec['path']} missing (its export failed or was not run)"}
    rec["deploy_files"] = deployed(spec["path"])
    rec["deployed_bytes"] = sum(rec["deploy_files"].values())
    if spec["how"] == "bench":
        out = work / "bench" / (key.replace(" ", "-").replace(",", "") + ".json")
        args = [
            "bench",
            spec["path"],
            "--threads",
            a.threads,
            "--prompt-len",
            a.prompt_lens,
            "--gen",
            a.gen,
            "--repeats",
            a.repeats,
            "--json",
            "--out",
            out,
        ]
        st = run_stage(f"bench {key}", args)
        if st["rc"] != 0:
            return rec | {"error": st.get("stderr_tail")}
        res = json.loads(out.read_text())
        return rec | {"runs": res["runs"], "roofline": res["roofline"], "decode_profile": res["decode_profile"]}
    return bench_runners({key: spec}, a)[key]


def bench_runners(specs: dict, a) -> dict:
    """The runner-timed artifacts, configuration-major: for each (threads, prompt length) every artifact in turn, so
    a change of the host's load over the run falls on ours and the peer alike rather than on one of them."""
    recs = {}
    for key, spec in specs.items():
        recs[key] = {"label": spec["label"], "backend": spec["backend"], "how": spec["how"], "path": str(spec["path"])}
        if not Path(spec["path"]).exists():
            recs[key]["error"] = f"{spec['path']} missing (its export failed or was not run)"
            continue
        recs[key]["deploy_files"] = deployed(spec["path"])
        recs[key]["deployed_bytes"] = sum(recs[key]["deploy_files"].values())
        recs[key]["runs"] = []
    live = [k for k in specs if "runs" in recs[k]]
    for t in map(int, a.threads.split(",")):
        for n in map(int, a.prompt_lens.split(",")):
            rounds: dict[str, list] = {key: [] for key in live}
            for _ in range(a.rounds):  # each round every artifact once: drift of the host falls on all alike
                for key in live:
                    r = run_runner(specs[key], SMOLLM2_135M.vocab_size, t, n, a.gen, a.repeats)
                    print(
                        f"  {key:38s} threads={t} prompt={n}: "
                        + (
                            f"decode {r['decode_tok_s']:.1f} tok/s, prefill {r['prefill_tok_s']:.0f} tok/s"
                            if "error" not in r
                            else f"FAILED {r['error'][-1]}"
                        ),
                        flush=True,
                    )
                    rounds[key].append(r)
            for key in live:
                recs[key]["runs"].append(merge_rounds(rounds[key]))
    for key in live:
        spec = specs[key]
        if spec["kind"] == "pte":  # where decode time goes: the .pte's ETDump op shares
            t, n = min(map(int, a.threads.split(","))), max(map(int, a.prompt_lens.split(",")))
            prof = run_runner(spec | {"profile": True}, SMOLLM2_135M.vocab_size, t, n, a.gen, a.repeats)
            recs[key]["decode_profile"] = {"threads": t, "context": n} | prof
    return recs


PAIRED = {  # both folders in one genai process, decode steps alternated (peer_runner.paired)
    "a": ("ours onnx-cpu (paired steps)", "ours-onnx/onnx-cpu", "ours in genai, generate_next_token, steps alternated"),
    "b": ("onnxruntime-genai (paired steps)", "genai", "the builder's folder in the same process, steps alternated"),
}


def bench_paired(work: Path, a) -> dict:
    """The PAIRED artifacts: per configuration `rounds` pairs of processes, each timing both folders step by step in
    turn, ours loaded first in one process of the pair and second in the other (the session loaded second tends to
    step faster: the order's bias cancels); speed figures only (one process holds both models, so no per-model
    memory). The same procedure with ours on both sides is the A/A control."""
    ex = work / "exports"
    recs = {}
    for k, (_key, rel, label) in PAIRED.items():
        recs[k] = {"label": label, "backend": "onnx", "how": "paired", "path": str(ex / rel), "runs": []}
        recs[k]["deploy_files"] = deployed(ex / rel)
        recs[k]["deployed_bytes"] = sum(recs[k]["deploy_files"].values())
    ours, peer = str(ex / PAIRED["a"][1]), str(ex / PAIRED["b"][1])
    for t in map(int, a.threads.split(",")):
        for n in map(int, a.prompt_lens.split(",")):
            got, step_ratios, control = {k: [] for k in PAIRED}, [], []
            for _ in range(a.rounds):
                for first in (True, False):
                    r, ratios_ = run_paired(ours, peer, first, t, n, a)
                    step_ratios += ratios_
                    for k in PAIRED:
                        got[k].append(r.get(k, {"threads": t, "prompt_len": n, "error": r.get("error")}))
                        rate = got[k][-1].get("decode_tok_s")
                        print(f"  {PAIRED[k][0]:38s} threads={t} prompt={n}: {rate}", flush=True)
                    control += run_paired(ours, ours, first, t, n, a)[1]
            for k in PAIRED:
                recs[k]["runs"].append(merge_rounds(got[k]))
            if step_ratios and "error" not in recs["a"]["runs"][-1]:
                recs["a"]["runs"][-1]["step_ratio"] = median_ci(step_ratios)
                if control:
                    recs["a"]["runs"][-1]["step_ratio_control"] = median_ci(control)
    return {PAIRED[k][0]: rec for k, rec in recs.items()}


def run_paired(ours: str, peer: str, ours_first: bool, threads: int, n: int, a) -> tuple[dict, list]:
    """One paired process: ({"a": ours' record, "b": the peer's}, per run ours' speed over the peer's per step)."""
    args = dict(kind="genai-paired", vocab=SMOLLM2_135M.vocab_size, threads=threads, prompt_len=n)
    args |= dict(a=ours, b=peer) if ours_first else dict(a=peer, b=ours)
    r = call_runner("onnxruntime-genai", args | dict(gen=a.gen, repeats=a.repeats))
    if "error" in r or ours_first:
        return r, r.get("step_ratios", [])
    return {"a": r["b"], "b": r["a"]}, [[1 / x for x in run] for run in r["step_ratios"]]


def merge_rounds(rs: list[dict]) -> dict:
    """One record from a configuration's rounds: the median of each round's figure (its own median over its repeats),
    the largest peak RSS; a failed round fails the configuration."""
    bad = [r for r in rs if "error" in r]
    if bad or len(rs) == 1:
        return (bad or rs)[0]
    out = dict(rs[0])
    for k, v in rs[0].items():
        if isinstance(v, float):
            vals = [r[k] for r in rs]
            out[k] = max(vals) if k == "peak_rss_mb" else statistics.median(vals)
    return out | {"rounds": len(rs), "loadavg_1m": statistics.median(r.get("loadavg_1m", 0.0) for r in rs)}


def median_ci(runs: list[list[float]], resamples: int = 2000, seed: int = 0) -> dict:
    """The median of every run's values pooled, and its 95 % interval from a bootstrap over whole runs (a run's steps
    share its moment on the host, so runs, not steps, are the independent draws); fixed seed: the same samples give
    the same interval."""
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(r, dtype=float) for r in runs]
    meds = [
        np.median(np.concatenate([arrays[i] for i in rng.integers(0, len(arrays), len(arrays))]))
        for _ in range(resamples)
    ]
    lo, hi = np.percentile(meds, [2.5, 97.5])
    med = float(np.median(np.concatenate(arrays)))
    return {
        "median": round(med, 4),
        "ci95": [round(float(lo), 4), round(float(hi), 4)],
        "runs": len(runs),
        "steps": sum(map(len, arrays)),
    }


def ratio(x, y):
    return round(x / y, 3) if x and y else None


def ratios(state: dict) -> list[dict]:
    """ours / peer per pair and (threads, prompt length): decode, decode from the median step, prefill, time to first
    token, runtime peak RSS; size and node count (ONNX); export seconds and peak RSS where both sides have an export
    stage."""
    out = []
    bench, exports = state["bench"], state["exports"]
    for what, ours, peer in PAIRS:
        o, p = bench.get(ours, {}), bench.get(peer, {})
        if "runs" not in o or "runs" not in p:
            out.append({"pair": what, "ours": ours, "peer": peer, "error": "one side was not measured"})
            continue
        pr = {(r["threads"], r["prompt_len"]): r for r in p["runs"] if "error" not in r}
        row = {"pair": what, "ours": ours, "peer": peer, "size": ratio(o["deployed_bytes"], p["deployed_bytes"])}
        eo, ep, imp = exports.get(ours), exports.get(peer), exports.get("ours import-hf")
        if eo and ep and imp and eo["rc"] == ep["rc"] == imp["rc"] == 0:
            # the peers go from the HF folder in one process, ours in two: import-hf, then export
            row["export_seconds"] = ratio(eo["seconds"] + imp["seconds"], ep["seconds"])
            row["export_peak_rss"] = ratio(max(eo["peak_rss_mb"], imp["peak_rss_mb"]), ep["peak_rss_mb"])
        go, gp = o.get("graph") or {}, p.get("graph") or {}
        if go.get("nodes") and gp.get("nodes"):
            row["nodes"] = ratio(go["nodes"], gp["nodes"])
        row["per_config"] = [
            {
                "threads": r["threads"],
                "prompt_len": r["prompt_len"],
                **{
                    k: ratio(r.get(k), pr[(r["threads"], r["prompt_len"])].get(k))
                    for k in ("decode_tok_s", "decode_tok_s_p50", "prefill_tok_s", "ttft_ms", "peak_rss_mb")
                },
                **({"decode_step_ratio": r["step_ratio"]} if "step_ratio" in r else {}),
                **({"decode_step_ratio_control": r["step_ratio_control"]} if "step_ratio_control" in r else {}),
            }
            for r in o["runs"]
            if "error" not in r and (r["threads"], r["prompt_len"]) in pr
        ]
        out.append(row)
    return out


def versions() -> dict:
    from importlib.metadata import version

    ours = ["pit-export", "torch", "executorch", "torchao", "onnxruntime", "onnxruntime-genai", "onnx", "transformers"]
    peers = {n: freeze(venv_python(n)) for n in PEERS if venv_python(n).is_file()}
    return {"ours": {p: version(p) for p in ours}, "peers_pinned": PEERS, "peers_installed": peers}


def tables(report: dict):
    from rich.table import Table

    t = Table(
        title=f"SmolLM2-135M config, context {report['context']}, gen {report['gen']} "
        f"({report['machine']['cpu']}, {report['machine']['cores']} cores)",
        title_justify="left",
    )
    cols = [
        "artifact",
        "thr",
        "prompt",
        "decode tok/s",
        "p50-based",
        "prefill tok/s",
        "TTFT ms",
        "step p50 ms",
        "peak RSS MB",
        "size MB",
        "export s",
        "export RSS MB",
        "load 1m",
    ]
    for c in cols:
        t.add_column(c, justify="left" if c == "artifact" else "right")
    for key, b in report["bench"].items():
        ex = report["exports"].get(key, {})  # timed artifacts named after their export
        size = f"{b['deployed_bytes'] / 1e6:.1f}" if "deployed_bytes" in b else "-"
        exs = (f"{ex['seconds']:.0f}", f"{ex['peak_rss_mb']:.0f}") if ex.get("rc") == 0 else ("-", "-")
        if "runs" not in b:
            t.add_row(key, *["-"] * 8, size, *exs, "", end_section=True)
            continue
        for i, r in enumerate(b["runs"]):
            if "error" in r:
                t.add_row(key if i == 0 else "", str(r["threads"]), str(r["prompt_len"]), "FAILED")
                continue
            t.add_row(
                key if i == 0 else "",
                str(r["threads"]),
                str(r["prompt_len"]),
                f"{r['decode_tok_s']:.1f}",
                f"{r['decode_tok_s_p50']:.1f}",
                f"{r['prefill_tok_s']:.0f}",
                f"{r['ttft_ms']:.0f}",
                f"{r['step_p50_ms']:.1f}",
                f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "–",  # paired: one process, two models
                size if i == 0 else "",
                *(exs if i == 0 else ("", "")),
                f"{r['loadavg_1m']:.1f}",
                end_section=i == len(b["runs"]) - 1,
            )
    imp = report["exports"].get("ours import-hf")
    if imp and imp["rc"] == 0:
        t.caption = (
            f"ours' export s / RSS are the export stage alone; import-hf before it took {imp['seconds']:.0f} s, "
            f"{imp['peak_rss_mb']:.0f} MB (the ratios below add it)"
        )
        t.caption_justify = "left"
    rt = Table(title="ours / peer", title_justify="left")
    for c in ["pair", "thr", "prompt", "decode", "decode (p50)", "prefill", "size", "export s", "export RSS"]:
        rt.add_column(c, justify="left" if c == "pair" else "right")
    for row in report["ratios"]:
        for i, c in enumerate(row.get("per_config") or [{}]):
            first = i == 0
            rt.add_row(
                row["pair"] if first else "",
                str(c.get("threads", "")),
                str(c.get("prompt_len", "")),
                *(str(c.get(k, "-")) for k in ("decode_tok_s", "decode_tok_s_p50", "prefill_tok_s")),
                *(str(row.get(k, "-")) if first else "" for k in ("size", "export_seconds", "export_peak_rss")),
            )
    return t, rt


def markdown(report: dict, threads: int = 1) -> str:
    """The README's tables from a written report: every artifact at `threads`, then the ratios."""
    imp = report["exports"].get("ours import-hf", {})
    lines = [
        "| artifact | prompt | decode tok/s (p50-based) | prefill tok/s | TTFT ms | peak RSS MB | MB | export s | "
        "export peak RSS MB | load 1m |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, b in report["bench"].items():
        ex = report["exports"].get(key, {})
        if ex.get("rc") == 0 and key.startswith("ours") and imp.get("rc") == 0:
            exs = f"{imp['seconds']:.0f} + {ex['seconds']:.0f} | {max(imp['peak_rss_mb'], ex['peak_rss_mb']):.0f}"
        else:
            exs = f"{ex['seconds']:.0f} | {ex['peak_rss_mb']:.0f}" if ex.get("rc") == 0 else "– | –"
        for r in (r for r in b.get("runs", []) if r.get("threads") == threads and "error" not in r):
            lines.append(
                f"| {key} | {r['prompt_len']} | {r['decode_tok_s']:.1f} ({r['decode_tok_s_p50']:.1f}) | "
                f"{r['prefill_tok_s']:.0f} | {r['ttft_ms']:.0f} | {r['peak_rss_mb']:.0f} | "
                f"{b['deployed_bytes'] / 1e6:.1f} | {exs} | {r['loadavg_1m']:.1f} |"
            )
            exs = " | "
    lines += [
        "",
        "| ours ÷ peer | threads | prompt | decode | decode (p50) | prefill | TTFT | peak RSS | size | nodes "
        "| export s | export RSS |",
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in report["ratios"]:
        for i, c in enumerate(row.get("per_config") or []):
            keys = ("size", "nodes", "export_seconds", "export_peak_rss")
            rest = [row.get(k, "–") if i == 0 else "" for k in keys]
            speed = ("decode_tok_s", "decode_tok_s_p50", "prefill_tok_s", "ttft_ms", "peak_rss_mb")
            vals = [c["threads"], c["prompt_len"], *(c.get(k, "–") for k in speed), *rest]
            lines.append(f"| {row['pair'] if i == 0 else ''} | " + " | ".join(map(str, vals)) + " |")
    return "\n".join(lines)


def load_state(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"exports": {}, "bench": {}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=PEERS_DIR / "work", help="Models, exports and cached stage records.")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "peers.json")
    ap.add_argument("--context", type=int, default=512, help="max_seq_len of every export (ours, optimum).")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt-lens", default="64,256")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="Timed runs per process (their median).")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="Runner processes per artifact and configuration, interleaved across artifacts.",
    )
    ap.add_argument(
        "--only",
        default=None,
        help="Comma-separated stages to run again: a name (its export and its timing), 'exports:NAME' or "
        "'bench:NAME' (one of them), or a group ('venvs', 'exports', 'bench'). Without it every stage not yet "
        "recorded in --work runs.",
    )
    ap.add_argument("--markdown", action="store_true", help="Print the README tables from --out; run nothing.")
    a = ap.parse_args(argv)
    if a.markdown:
        print(markdown(json.loads(a.out.read_text())))
        return 0
    only = set(a.only.split(",")) if a.only else None

    def wanted(name: str, group: str) -> bool:
        if only is None:
            return name not in state[group]
        return bool({name, group, f"{group}:{name}"} & only)

    a.work.mkdir(parents=True, exist_ok=True)
    state_file = a.work / "state.json"
    state = load_state(state_file)
    save = lambda: state_file.write_text(json.dumps(state, indent=2, default=str) + "\n")  # noqa: E731
    venv_errors = {}
    if only is None or "venvs" in only:
        for name in PEERS:
            try:
                ensure_venv(name)
            except subprocess.CalledProcessError as e:  # that peer is reported as failed, the rest goes on
                venv_errors[name] = str(e)
    build_hf(a.work)
    for name, (cmd, args, env, _) in export_stages(a.work, a.context).items():
        if wanted(name, "exports"):
            try:
                state["exports"][name] = run_stage(name, args, cmd, env)
            except OSError as e:  # its venv is missing
                state["exports"][name] = {"stage": name, "rc": None, "error": str(e)}
            save()
    todo = {k: spec for k, spec in timed_artifacts(a.work).items() if wanted(k, "bench")}
    for key, spec in todo.items():
        if spec["how"] == "bench":
            print(f"timing {key}", flush=True)
            state["bench"][key] = bench_one(key, spec, a.work, a)
            save()
    runners = {k: spec for k, spec in todo.items() if spec["how"] == "runner"}
    if runners:  # one configuration at a time across artifacts: ours and its peer run back to back in each
        print(f"timing {', '.join(runners)}, interleaved", flush=True)
        state["bench"] |= bench_runners(runners, a)
        save()
    if wanted("paired steps", "bench"):
        print("timing ours onnx-cpu and onnxruntime-genai, steps paired in one process", flush=True)
        state["bench"] |= bench_paired(a.work, a)
        save()
    from pit_export.bench import machine

    for b in state["bench"].values():  # read from the graph each time: cheap, and valid for cached timings too
        if b["backend"] == "onnx" and Path(b["path"], "model.onnx").is_file():
            b["graph"] = onnx_summary(Path(b["path"]))

    report = {
        "model": "SmolLM2-135M configuration (vocab 49152, d 576, 30 layers, 9/3 heads, ffn 1536, rope 1e5), "
        "random init with transformers LlamaForCausalLM, tied",
        "context": a.context,
        "gen": a.gen,
        "repeats": a.repeats,
        "rounds": a.rounds,
        "machine": machine(),
        "versions": versions(),
        "exports": state["exports"],
        "bench": state["bench"],
        "ratios": ratios(state),
        "venv_errors": venv_errors,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    from rich.console import Console

    for t in tables(report):
        Console(width=200).print(t)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

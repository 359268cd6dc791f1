"""Scale proof: a SmolLM2-135M-shaped HF model (random init, tied) through import -> fold -> export -> validate.

    .venv/bin/python benchmarks/scale.py [--work DIR] [--out benchmarks/results/scale-135m.json]

Every stage is the real CLI in its own process; wall time and its peak memory are recorded: os.wait4's ru_maxrss
(the largest RSS of the process or any child it forked) and, sampled every 20 ms while it has children, the summed PSS
of the whole process tree (a forked worker and its parent share pages; PSS counts each page once). A stage's peak is
the larger of the two. The budget is 3x the fp32 checkpoint size. The tokenizer (vocab 49152) is a byte-level BPE
trained on the repo's corpus, topped up with reserved tokens to the exact size; the model is built with transformers
and save_pretrained here: nothing is downloaded."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pit_export.models.pit import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# SmolLM2-135M: vocab 49152, hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads, tied, rope theta 1e5
SMOLLM2_135M = ModelConfig(
    vocab_size=49152,
    dim=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    ffn_dim=1536,
    max_seq_len=8192,
    rope_theta=100000.0,
    norm_eps=1e-5,
    tying="tied",
)
CLI = [sys.executable, "-m", "pit_export"]


def build_tokenizer(vocab: int, dest: Path) -> Path:
    from pit_export.models.corpus import build_corpus
    from pit_export.models.train import train_tokenizer

    tok = train_tokenizer(build_corpus(max_train_bytes=4_000_000)[0], vocab)
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(vocab - tok.get_vocab_size())])
    assert tok.get_vocab_size() == vocab
    tok.save(str(dest))
    return dest


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration):  # gone meanwhile
        return 0


def _children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    kids = []
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                kids += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return kids


def tree_pss_mb(root: int) -> float:
    """Physical memory of `root` and its descendants: summed PSS (shared pages split between their sharers).

    0 while `root` runs alone: its ru_maxrss is then exact, and reading smaps_rollup of a large process every 20 ms
    would cost the stage a good part of a core."""
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += _children(pid)
    return sum(_pss_kb(pid) for pid in tree) / 1024 if len(tree) > 1 else 0.0


def run_stage(name: str, args: list, cmd: list = CLI, env: dict | None = None) -> dict:
    """One process (the CLI unless `cmd` says otherwise): wall seconds, peak memory (MB, see the module doc), exit
    code, parsed --json stdout."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se:
        env = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
        p = subprocess.Popen([*map(str, cmd), *map(str, args)], stdout=so, stderr=se, env=env)
        tree_peak, done = [0.0], threading.Event()

        def sample():
            while not done.wait(0.02):
                tree_peak[0] = max(tree_peak[0], tree_pss_mb(p.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, ru = os.wait4(p.pid, 0)
        done.set()
        sampler.join()
        dt = time.perf_counter() - t0
        so.seek(0), se.seek(0)
        stdout, stderr = so.read().decode(), se.read().decode()
    rc = os.waitstatus_to_exitcode(status)
    rss_mb = ru.ru_maxrss / 1024
    rec = {
        "stage": name,
        "seconds": round(dt, 1),
        "peak_mb": round(max(rss_mb, tree_peak[0]), 1),
        "peak_rss_mb": round(rss_mb, 1),
        "peak_tree_pss_mb": round(tree_peak[0], 1),
        "rc": rc,
    }
    try:
        rec["result"] = json.loads(stdout)
    except json.JSONDecodeError:
        rec["stderr_tail"] = stderr.strip().splitlines()[-3:]
    print(
        f"{name:24s} rc={rc} {dt:7.1f}s  peak {rec['peak_mb']:8.1f} MB (RSS {rss_mb:.0f}, tree PSS {tree_peak[0]:.0f})",
        flush=True,
    )
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale-135m.json")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--n-windows", type=int, default=4)
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="Stages of one wave (the two exports, the two validations) "
        "run concurrently: wall times then include contention; peak RSS stays per process.",
    )
    ap.add_argument(
        "--only",
        default=None,
        help="Comma-separated stage names to run; the others' records are kept "
        "from an existing --out file (resuming an interrupted run).",
    )
    a = ap.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="pit-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    from tests.hf_models import save_hf

    t0 = time.perf_counter()
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        tok = build_tokenizer(SMOLLM2_135M.vocab_size, work / "tokenizer.json")
        save_hf(hf, SMOLLM2_135M, tok)
    setup_s = time.perf_counter() - t0
    ckpt_bytes = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    pit, w = work / "pit", str(a.n_windows)
    targets = {t: work / "out" / t / t for t in ("android", "onnx-cpu", "ios")}  # OUT/<target>: the artifact folder
    waves = [
        [("import-hf", ["import-hf", hf, "--out", pit, "--init", "output", "--max-seq-len", a.max_seq_len, "--json"])],
        [("fold shared-z", ["fold", pit, "--layout", "shared-z", "--out", work / "folded", "--json"])],
        [
            (
                f"export {t}",
                [
                    "export",
                    pit,
                    "--target",
                    t,
                    "--scheme",
                    "fp32",
                    "--out",
                    d.parent,
                    "--no-validate",
                    "--force",
                    "--json",
                ],
            )
            for t, d in targets.items()
        ],
        [(f"validate {t}", ["validate", pit, "--artifact", d, "--n-windows", w, "--json"]) for t, d in targets.items()],
    ]
    only = set(a.only.split(",")) if a.only else None
    kept, kept_parity = {}, {}
    if only and a.out.is_file():
        old = json.loads(a.out.read_text())
        kept, kept_parity = {r["stage"]: r for r in old["stages"]}, old.get("parity", {})
    records = []
    for wave in waves:
        run = [(n, args) for n, args in wave if only is None or n in only]
        with ThreadPoolExecutor(max(1, min(a.jobs, len(run) or 1))) as pool:
            done = dict(zip([n for n, _ in run], pool.map(lambda st: run_stage(*st), run), strict=True))
        records += [done.get(n) or kept[n] for n, _ in wave if n in done or n in kept]
    budget_mb = 3 * ckpt_bytes / 1e6 * (1e6 / 2**20)
    parity = dict(kept_parity)
    for r in records:
        if r["stage"].startswith("validate") and "result" in r:
            res = r["result"]["results"][0]
            parity[r["stage"].split()[1]] = {"passed": res["passed"], **res["metrics"]}
    report = {
        "model": "SmolLM2-135M configuration, random init (transformers LlamaForCausalLM), tied",
        "config": SMOLLM2_135M.__dict__,
        "max_seq_len": a.max_seq_len,
        "fp32_checkpoint_mb": round(ckpt_bytes / 2**20, 1),
        "rss_budget_mb": round(budget_mb, 1),
        "setup_seconds": round(setup_s, 1),
        "jobs": a.jobs,
        "stages": records,
        "within_budget": {r["stage"]: r.get("peak_mb", r["peak_rss_mb"]) <= budget_mb for r in records},
        "import": next((r["result"] for r in records if r["stage"] == "import-hf" and "result" in r), None),
        "parity": parity,
        "host": {"cpus": os.cpu_count()},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {a.out}; budget {budget_mb:.0f} MB")
    return 0 if all(r["rc"] == 0 for r in records) and all(p["passed"] for p in parity.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

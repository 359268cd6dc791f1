"""Timing of an artifact through its Session (prefill, decode, time to first token, RSS, load), the same code for
every backend. Each (threads, prompt length) configuration runs in its own subprocess so that peak RSS belongs to that
artifact and configuration alone; the first run of each is a warm-up and is not counted."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pit_export.errors import BadInput, PitError
from pit_export.models.checkpoint import scratch_dir

RESULTS = Path("benchmarks/results")


@dataclass(frozen=True)
class BenchConfig:
    threads: tuple[int, ...] = (1, 2)
    prompt_lens: tuple[int, ...] = (64, 128)
    gen: int = 64  # decode steps after the first token
    repeats: int = 3  # measured runs per configuration (one warm-up run more)
    count_instructions: bool = False  # arm64-emu: executed instructions per decoded token (minutes)


@dataclass
class RunStats:
    """One (threads, prompt_len) configuration: medians over the measured runs; decode steps pooled for p50/p90."""

    threads: int
    prompt_len: int
    gen: int
    repeats: int
    load_s: float
    prefill_tok_s: float
    decode_tok_s: float  # steps / their total time (median over runs): what a user sees, preemptions included
    decode_tok_s_p50: float  # 1 / median step: less sensitive to other processes on a shared host
    ttft_ms: float
    step_p50_ms: float
    step_p90_ms: float
    peak_rss_mb: float  # VmHWM of the configuration's process
    base_rss_mb: float  # before the artifact is opened: interpreter + pit_export's imports (torch among them)
    session_rss_mb: float  # peak - base: what opening and running this artifact added
    loadavg_1m: float  # at the start of this configuration: the host is shared, wall times are contended
    first_token: int = 0  # the greedy token after the prompt: a cheap cross-check between configurations


def parse_ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise BadInput(f"{flag} takes comma-separated positive integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise BadInput(f"{flag} takes comma-separated positive integers, got {text!r}")
    return vals


def artifact_info(folder: Path) -> dict:
    """What the bench reads of an artifact without opening a runtime: backend, scheme, context, deployed size."""
    meta_file, cfg_file = folder / "pit_export.json", folder / "config.json"
    if not meta_file.is_file() or not cfg_file.is_file():
        raise BadInput(f"{folder}: not an artifact folder (no pit_export.json / config.json)")
    from pit_export.models.checkpoint import artifact_config, read_json

    meta = read_json(meta_file, "artifact manifest", 16 << 20)
    cfg = asdict(artifact_config(folder))
    if not isinstance(meta, dict) or not isinstance(meta.get("deploy_files", []), list):
        raise BadInput(f"{meta_file}: not an artifact manifest")
    files = meta.get("deploy_files") or []
    missing = [f for f in files if not (folder / f).is_file()]
    if not files or missing:
        raise BadInput(f"{folder}: deployed files missing ({', '.join(missing) or 'none listed'})")
    return {
        "path": str(folder),
        "backend": meta.get("backend"),
        "target": meta.get("target"),
        "scheme": meta.get("scheme"),
        "layout": meta.get("layout"),
        "embedding_bits": meta.get("embedding_bits"),
        "deploy_files": {f: (folder / f).stat().st_size for f in files},
        "deployed_bytes": sum((folder / f).stat().st_size for f in files),
        "config": cfg,
    }


def check_config(cfg: BenchConfig, max_seq_len: int):
    if cfg.repeats < 1:
        raise BadInput(f"--repeats must be >= 1, got {cfg.repeats}")
    if cfg.gen < 1:
        raise BadInput(f"--gen must be >= 1, got {cfg.gen}")
    longest = max(cfg.prompt_lens) + cfg.gen
    if longest > max_seq_len:
        raise BadInput(
            f"prompt length {max(cfg.prompt_lens)} + --gen {cfg.gen} = {longest} tokens exceeds the "
            f"model context of {max_seq_len}"
        )


def machine() -> dict:
    """The host, described: timings mean little without it (and without the load when they were taken)."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)),
        "loadavg": list(os.getloadavg()),
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def _rss_kb(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return float(line.split()[1])
    return float("nan")


def measure(folder: Path, threads: int, prompt_len: int, gen: int, repeats: int) -> RunStats:
    """In this process (the bench runs it in a fresh one per configuration): load, warm up, measure."""
    from pit_export.runtimes import open_session
    from pit_export.runtimes.timing import prompt_tokens, timed_run

    load_avg = os.getloadavg()[0]
    base = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    sess = open_session(folder, threads=threads)
    load_s = time.perf_counter() - t0
    prompt = prompt_tokens(prompt_len, sess.vocab_size)
    timed_run(sess, prompt, min(gen, 4))  # warm-up: first-call allocations, weight packing, caches
    runs = [timed_run(sess, prompt, gen) for _ in range(repeats)]
    sess.close()
    steps = [s for r in runs for s in r["steps"]]
    return RunStats(
        threads=threads,
        prompt_len=prompt_len,
        gen=gen,
        repeats=repeats,
        load_s=load_s,
        prefill_tok_s=statistics.median(prompt_len / r["ttft"] for r in runs),
        decode_tok_s=statistics.median(len(r["steps"]) / sum(r["steps"]) for r in runs),
        decode_tok_s_p50=1 / float(np.percentile(steps, 50)),
        ttft_ms=1e3 * statistics.median(r["ttft"] for r in runs),
        step_p50_ms=1e3 * float(np.percentile(steps, 50)),
        step_p90_ms=1e3 * float(np.percentile(steps, 90)),
        peak_rss_mb=_rss_kb("VmHWM") / 1024,
        base_rss_mb=base / 1024,
        session_rss_mb=(_rss_kb("VmHWM") - base) / 1024,
        loadavg_1m=load_avg,
        first_token=runs[0]["tokens"][0],
    )


def measure_in_subprocess(folder: Path, threads: int, prompt_len: int, gen: int, repeats: int) -> RunStats:
    args = json.dumps([str(folder), threads, prompt_len, gen, repeats])
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-m", "pit_export.bench", args], capture_output=True, text=True, env=env)
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        why = (p.stderr.strip().splitlines() or ["no output"])[-1]
        err = PitError(f"bench worker failed (threads={threads}, prompt={prompt_len}): {why}")
        err.exit_code = p.returncode if p.returncode in (2, 4) else 1
        raise err
    return RunStats(**json.loads(lines[-1]))


def profile_decode(folder: Path, threads: int, prompt_len: int, gen: int) -> dict:
    """Where one decode step's time goes, over up to 32 steps after 2 warm-up steps (within prompt_len + gen): cProfile
    per Python/native entry point for every backend, plus the runtime's own per-op trace where the session offers one
    (op_profile)."""
    import cProfile
    import pstats

    from pit_export.runtimes import open_session
    from pit_export.runtimes.timing import prompt_tokens

    with scratch_dir() as tmp:
        sess = open_session(folder, threads=threads, profile_dir=tmp)
        prompt = prompt_tokens(prompt_len, sess.vocab_size)
        tok = int(np.argmax(sess.prefill(prompt, 0, last_only=True)[-1]))
        warm = min(2, gen - 1)
        steps = min(32, gen - warm)
        for i in range(warm):
            tok = int(np.argmax(sess.decode(tok, prompt_len + i)))
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for i in range(warm, warm + steps):
            tok = int(np.argmax(sess.decode(tok, prompt_len + i)))
        prof.disable()
        wall = (time.perf_counter() - t0) / steps
        ops = sess.op_profile(skip_runs=1 + warm) if hasattr(sess.inner, "op_profile") else None
        sess.close()
    stats = pstats.Stats(prof).stats
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:8]
    out = {
        "threads": threads,
        "context": prompt_len,
        "steps": steps,
        "step_us": 1e6 * wall,
        "functions_us_per_step": {f"{fn} ({Path(f).name}:{line})": 1e6 * v[2] / steps for (f, line, fn), v in top},
    }
    if ops is not None:  # the runtime's trace inflates absolute times (profiling overhead): the shares are what count
        total = sum(ops.values()) or 1.0
        out["ops_us_per_step"] = {k: v / steps for k, v in ops.items()}
        out["ops_share"] = {k: v / total for k, v in ops.items()}
    return out


def run_host(folder: Path, info: dict, cfg: BenchConfig, progress=lambda msg: None) -> dict:
    from pit_export.roofline import host_bandwidth, projection, token_bytes

    runs = []
    for threads in cfg.threads:
        for n in cfg.prompt_lens:
            progress(f"host: threads={threads} prompt={n} gen={cfg.gen} x{cfg.repeats}")
            runs.append(measure_in_subprocess(folder, threads, n, cfg.gen, cfg.repeats))
    progress("host: memory bandwidth")
    bw = host_bandwidth() | {"loadavg_1m": os.getloadavg()[0]}
    proj = []
    for r in runs:
        tb = token_bytes(folder, info, r.prompt_len + cfg.gen // 2)  # mean context over the decode steps
        where = {"threads": r.threads, "prompt_len": r.prompt_len}
        proj.append(where | projection(tb, bw["read_gbs"], r.decode_tok_s_p50))
    progress("host: profile one decode step")
    prof = profile_decode(folder, min(cfg.threads), max(cfg.prompt_lens), cfg.gen)
    return {"runs": to_dicts(runs), "bandwidth": bw, "roofline": proj, "decode_profile": prof}


def run_adb(folder: Path, info: dict, cfg: BenchConfig, progress=lambda msg: None) -> dict:
    from pit_export.adb import run

    return run(folder, info, cfg, progress)


def run_emu(folder: Path, info: dict, cfg: BenchConfig, progress=lambda msg: None) -> dict:
    from pit_export.emu import run

    return run(folder, info, cfg, progress)


# --where: place -> runner(folder, artifact info, config, progress) -> result fields of the JSON
PLACES = {"host": run_host, "arm64-emu": run_emu, "adb": run_adb}
LABELS = {
    "host": "measured on this host (shared machine: see loadavg per run)",
    "arm64-emu": "EMULATED ARM64 (QEMU user mode): parity and ARM code path only; wall times are not phone latencies",
    "adb": "measured on an attached Android device",
}


def bench(folder: Path, where: str, cfg: BenchConfig, progress=lambda msg: None) -> dict:
    if where not in PLACES:
        raise BadInput(f"--where must be one of {', '.join(PLACES)}, got {where!r}")
    folder = Path(folder)
    info = artifact_info(folder)
    check_config(cfg, info["config"]["max_seq_len"])
    result = PLACES[where](folder, info, cfg, progress)
    return {
        "schema": 1,
        "where": where,
        "label": LABELS[where],
        "machine": machine(),
        "artifact": {k: v for k, v in info.items() if k != "config"} | {"model": info["config"]},
        "config": asdict(cfg),
        **result,
    }


def default_out(info: dict, where: str) -> Path:
    return RESULTS / f"bench-{info['backend']}-{where}.json"


BENCH_KEYS = {"schema", "where", "label", "machine", "artifact", "config"}  # what bench() writes, recognised


def check_out_file(path: Path, artifact: Path) -> None:
    """The JSON may replace only an earlier bench result, and never lands in (or on) the artifact it measures."""
    from pit_export.models.checkpoint import OutputError, within

    path = Path(path)
    out, art = path.resolve(), Path(artifact).resolve()
    if within(out, art) or within(art, out):
        raise OutputError(f"--out {path} is or lies inside the artifact {artifact}; choose a file outside it")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OutputError(f"--out {path} exists and is not a plain file; choose another file")
    if path.exists():
        try:
            ours = BENCH_KEYS <= set(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise OutputError(f"--out {path} exists and is not a pit-export bench result; choose another file")


def write_json(data: dict, path: Path):
    from pit_export.models.checkpoint import OutputError

    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


def to_dicts(stats: list[RunStats]) -> list[dict]:
    return [asdict(s) for s in stats]


SKIP_COLS = {"gen", "repeats", "first_token", "base_rss_mb"}


def table(data: dict):
    """The runs as a rich table (every numeric field, whatever the place), projections in the caption."""
    from rich.table import Table

    runs = data["runs"]
    cols = [k for k in runs[0] if k not in SKIP_COLS and not isinstance(runs[0][k], dict | list)]
    t = Table(title=f"{data['artifact']['path']} [{data['where']}] {data['machine']['cpu']}", title_justify="left")
    for c in cols:
        t.add_column(c.replace("_", " "), justify="right")
    for r in runs:
        t.add_row(*(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    notes = []
    if "roofline" in data:
        r, bw = data["roofline"][0], data["bandwidth"]
        tb = r["bytes_per_token"]
        notes.append(
            f"bytes/token {tb['total'] / 1e6:.3f} MB at context {tb['context']}; host read bandwidth "
            f"{bw['read_gbs']:.1f} GB/s -> roofline {r['host_roofline_tok_s']:.0f} tok/s, reached "
            f"{100 * r['host_roofline_fraction']:.2f}% (threads={r['threads']}, prompt={r['prompt_len']})"
        )
        notes += [
            f"PROJECTED {k} ({v['bandwidth_gbs']:g} GB/s): roofline {v['roofline_tok_s']:.0f} tok/s, at host "
            f"efficiency {v['at_host_efficiency_tok_s']:.0f} tok/s"
            for k, v in r["phones_projected"].items()
        ]
    t.caption = "\n".join(notes) or None
    t.caption_justify = "left"
    return t


def _worker(argv: list[str]) -> int:
    from pit_export.quiet import quiet_toolchains

    quiet_toolchains()
    folder, threads, prompt_len, gen, repeats = json.loads(argv[0])
    try:
        stats = measure(Path(folder), threads, prompt_len, gen, repeats)
    except PitError as e:
        print(str(e).splitlines()[0], file=sys.stderr)
        return e.exit_code
    print(json.dumps(asdict(stats)))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))

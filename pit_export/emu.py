"""--where arm64-emu: run the artifact's runtime as aarch64 code under QEMU user mode (root built by `make emu`).

It proves the ARM64 kernels run and agree with the host (logits parity on the same tokens); its wall times are
emulated (8-400x off, depending on how much NEON the kernels use) and never a phone latency."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from pit_export.errors import Unavailable
from pit_export.models.checkpoint import scratch_dir
from pit_export.runtimes.timing import prompt_tokens

EMU_ROOT = Path(os.environ.get("PIT_EMU_ROOT", ".emu/arm64"))
QEMU = "qemu-aarch64-static"
QEMU_CPU = "cortex-a76"  # the fake /proc/cpuinfo in the root says Cortex-A76 too; 'max' adds SVE/SME and is slower
# runtimes/ is the package pit_export.runtimes (a source tree maps it there too): found by its module, not by a path
RUNNER = Path(importlib.util.find_spec("pit_export.runtimes").origin).parent / "remote_runner.py"
# backend -> why it cannot run in the emulated root (the root holds numpy + onnxruntime only)
NOT_EMULATED = {
    "executorch": "ExecuTorch's Python runtime links libtorch; the aarch64 torch wheel (427 MB) links ~2.9 GB of CUDA "
    "libraries (one not on the registry): not installed in the emulated root",
    "coreml": "CoreML runs on Apple devices only",
}
PARITY_ATOL = {"fp32": 1e-4}  # other schemes: reported, not gated (same kernels family, different instruction sets)


def root() -> Path:
    if shutil.which(QEMU) is None:
        raise Unavailable(f"{QEMU} not found: run `make emu` (installs qemu-user-static and builds the ARM64 root)")
    if not (EMU_ROOT / ".complete").is_file():
        raise Unavailable(f"no emulated ARM64 root at {EMU_ROOT}: run `make emu`")
    return EMU_ROOT


def emulated_python(script: Path, arg: str, timeout: float) -> str:
    r = root()
    env = os.environ | {"QEMU_CPU": QEMU_CPU, "OMP_NUM_THREADS": "1"}
    cmd = [QEMU, "-L", str(r), str(r / "usr/bin/python3.11"), str(script), arg]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"emulated runner failed: {(p.stderr.strip().splitlines() or ['no output'])[-1]}")
    return p.stdout.strip().splitlines()[-1]


def host_logits(folder: Path, prompt: np.ndarray, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The host runtime on the emulated run's exact tokens (not its own greedy choices)."""
    from pit_export.runtimes import open_session

    sess = open_session(folder, threads=1)
    pre = sess.prefill(prompt, 0)
    dec = np.stack([sess.decode(t, len(prompt) + i) for i, t in enumerate(tokens[:-1])])
    sess.close()
    return pre, dec


QEMU_PLUGGABLE = "qemu-aarch64"  # the dynamically linked build (Debian qemu-user) loads TCG plugins
PLUGIN = EMU_ROOT.parent / "libinsncount.so"  # built by `make emu` from benchmarks/emu/insn_count.c


def qemu_plugins() -> str | None:
    """None if executed ARM instructions can be counted here (plugin-capable QEMU + the counting plugin), else why."""
    if shutil.which(QEMU_PLUGGABLE) is None:
        return f"{QEMU_PLUGGABLE} (Debian qemu-user, plugin-capable) not installed; {QEMU} cannot load plugins"
    if not PLUGIN.is_file():
        return f"no instruction-count plugin at {PLUGIN} (make emu builds it; needs a C compiler)"
    return None


def _runner_args(folder: Path, prompt: np.ndarray, gen: int, out: str, threads: int = 1, repeats: int = 1) -> str:
    args = {"folder": str(folder.resolve()), "threads": threads, "prompt": prompt.tolist(), "gen": gen}
    return json.dumps(args | {"repeats": repeats, "out": out})


def _per_token(counts: list[int], gens, tool: str, isa: str, prompt_len: int) -> dict:
    # two runs differing only in decode steps: start-up, load, prefill and warm-up cancel in the difference
    return {
        f"{isa}_instructions_per_decoded_token": (counts[1] - counts[0]) / (gens[1] - gens[0]),
        "tool": tool,
        "context": prompt_len,
        "runs_total": counts,
        "decode_steps": list(gens),
        "threads": 1,
    }


def arm_instructions(folder: Path, vocab: int, prompt_len: int, gens=(4, 20)) -> dict:
    """Executed ARM64 instructions per decoded token (QEMU TCG plugin, inline count): independent of emulation
    speed and machine load."""
    counts = []
    with scratch_dir() as tmp:
        for gen in gens:  # a fixed hash seed: the same Python code path in both runs
            env = os.environ | {"QEMU_CPU": QEMU_CPU, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
            cmd = [
                QEMU_PLUGGABLE,
                "-plugin",
                str(PLUGIN),
                "-L",
                str(EMU_ROOT),
                str(EMU_ROOT / "usr/bin/python3.11"),
                str(RUNNER),
                _runner_args(folder, prompt_tokens(prompt_len, vocab), gen, f"{tmp}/l.npz"),
            ]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
            m = re.search(r"insns: (\d+)", p.stderr)
            if p.returncode != 0 or m is None:
                return {"skipped": f"counting run failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}"}
            counts.append(int(m.group(1)))
    return _per_token(counts, gens, "QEMU TCG plugin (benchmarks/emu/insn_count.c)", "arm64", prompt_len)


def host_instructions(folder: Path, vocab: int, prompt_len: int, gens=(4, 20)) -> dict:
    """Executed x86-64 instructions per decoded token on the host (valgrind callgrind, all threads), same runner:
    the fallback where ARM instructions cannot be counted. Not an ARM count."""
    if shutil.which("valgrind") is None:
        return {"skipped": "valgrind not installed"}
    counts = []
    with scratch_dir() as tmp:
        for gen in gens:
            cmd = [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={tmp}/cg.out",
                sys.executable,
                str(RUNNER),
                _runner_args(folder, prompt_tokens(prompt_len, vocab), gen, f"{tmp}/l.npz"),
            ]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            m = re.search(r"Collected : (\d+)", p.stderr)
            if p.returncode != 0 or m is None:
                return {"skipped": f"valgrind run failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}"}
            counts.append(int(m.group(1)))
    return _per_token(counts, gens, "valgrind callgrind (Ir)", "x86_64", prompt_len)


def instruction_counts(folder: Path, info: dict, prompt_len: int) -> dict:
    vocab = info["config"]["vocab_size"]
    why = qemu_plugins()
    if why is None:
        return {"arm64": arm_instructions(folder, vocab, prompt_len)}
    return {"arm64": {"skipped": why}, "host": host_instructions(folder, vocab, prompt_len)}


def run(folder: Path, info: dict, cfg, progress=lambda msg: None) -> dict:
    if info["backend"] in NOT_EMULATED:
        raise Unavailable(f"arm64-emu: {NOT_EMULATED[info['backend']]}")
    root()
    vocab = info["config"]["vocab_size"]
    runs = []
    for threads in cfg.threads:
        for n in cfg.prompt_lens:
            progress(f"arm64-emu: threads={threads} prompt={n} gen={cfg.gen} x{cfg.repeats} (emulated: slow)")
            prompt = prompt_tokens(n, vocab)
            with scratch_dir() as tmp:
                args = _runner_args(folder, prompt, cfg.gen, f"{tmp}/logits.npz", threads, cfg.repeats)
                load = os.getloadavg()[0]
                res = json.loads(emulated_python(RUNNER, args, timeout=3600))
                emu = np.load(f"{tmp}/logits.npz")
                pre, dec = host_logits(folder, prompt, emu["tokens"].tolist())
                runs.append(summarize(res, n, threads, load) | parity(emu, pre, dec, info["scheme"]))
    result = {"runs": runs, "emulator": {"qemu": QEMU, "cpu": QEMU_CPU, "root": str(EMU_ROOT)} | build_info()}
    if cfg.count_instructions:
        progress("instruction counts (valgrind: minutes)")
        result["instructions"] = instruction_counts(folder, info, min(cfg.prompt_lens))
    return result


def summarize(res: dict, n: int, threads: int, load: float) -> dict:
    ttft = float(np.median([r["ttft"] for r in res["runs"]]))
    steps = [s for r in res["runs"] for s in r["steps"]]
    return {
        "threads": threads,
        "prompt_len": n,
        "emulated_load_s": res["load_s"],
        "emulated_ttft_ms": 1e3 * ttft,
        "emulated_prefill_tok_s": n / ttft,
        "emulated_decode_tok_s": float(np.median([len(r["steps"]) / sum(r["steps"]) for r in res["runs"]])),
        "emulated_step_p50_ms": 1e3 * float(np.percentile(steps, 50)),
        "loadavg_1m": load,
    }


def parity(emu, pre: np.ndarray, dec: np.ndarray, scheme: str) -> dict:
    d = max(float(np.abs(emu["prefill"] - pre).max()), float(np.abs(emu["decode"] - dec).max()))
    same = bool((emu["decode"].argmax(-1) == dec.argmax(-1)).all() and emu["prefill"][-1].argmax() == pre[-1].argmax())
    gate = PARITY_ATOL.get(scheme)
    return {
        "parity_max_abs": d,
        "parity_top1_same": same,
        "parity_gate": gate,
        "parity_ok": None if gate is None else d <= gate,
    }


def build_info() -> dict:
    f = EMU_ROOT / ".build-info"
    return {"build": f.read_text().strip()} if f.is_file() else {}

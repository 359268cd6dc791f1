"""--where arm64-emu: run the artifact's runtime as aarch64 code under QEMU user mode (root built by `make emu`).

The root holds the aarch64 wheels of onnxruntime and of ExecuTorch (with the torch it links; its CUDA libraries are
stand-ins that ExecuTorch never calls), so the kernels that run are the ones a phone's CPU runs: XNNPACK's and ONNX
Runtime's ARM64 NEON paths. Three uses:
  EmulatedSession   the artifact's own Session inside the root, served to the host: validation (the same metrics
                    and gates as on the host) and generation run unchanged against ARM64 kernels
  run()             bench: emulated timings (8-400x off, depending on how much NEON the kernels use; never a phone
                    latency) and logits parity with the host on the same tokens
  instruction counts executed ARM64 instructions per prefill and per decoded token (a QEMU TCG plugin): independent
                    of emulation speed and machine load, so close comparisons are settled by counts"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from pit_export.errors import PitError, Unavailable
from pit_export.models.checkpoint import scratch_dir
from pit_export.runtimes.timing import prompt_tokens

EMU_ROOT = Path(os.environ.get("PIT_EMU_ROOT", ".emu/arm64"))
QEMU = "qemu-aarch64-static"
QEMU_CPU = "cortex-a76"  # the fake /proc/cpuinfo in the root says Cortex-A76 too; 'max' adds SVE/SME and is slower
# runtimes/ is the package pit_export.runtimes (a source tree maps it there too): found by its module, not by a path
RUNNER = Path(importlib.util.find_spec("pit_export.runtimes").origin).parent / "remote_runner.py"
# backend -> the marker of the root's layer that holds its runtime (benchmarks/emu/build-arm64.sh)
LAYERS = {"onnx": ".complete", "executorch": ".executorch-complete"}
NOT_EMULATED = {"coreml": "CoreML runs on Apple devices only", "torch": "a PyTorch folder is not a deployed artifact"}
PARITY_ATOL = {"fp32": 1e-4}  # other schemes: reported, not gated (same kernels family, different instruction sets)


def root(backend: str = "onnx") -> Path:
    if backend in NOT_EMULATED:
        raise Unavailable(f"arm64-emu: {NOT_EMULATED[backend]}")
    if shutil.which(QEMU) is None:
        raise Unavailable(f"{QEMU} not found: run `make emu` (installs qemu-user-static and builds the ARM64 root)")
    if not (EMU_ROOT / ".complete").is_file():
        raise Unavailable(f"no emulated ARM64 root at {EMU_ROOT}: run `make emu`")
    if not (EMU_ROOT / LAYERS.get(backend, ".complete")).is_file():
        raise Unavailable(f"the emulated ARM64 root at {EMU_ROOT} has no {backend} runtime: run `make emu`")
    return EMU_ROOT


def guest_env(threads: int = 1) -> dict:
    # a fixed hash seed: the same Python code path in every run (instruction counts compare runs)
    return os.environ | {"QEMU_CPU": QEMU_CPU, "OMP_NUM_THREADS": str(threads), "PYTHONHASHSEED": "0"}


def guest_python(r: Path) -> list[str]:
    return [QEMU, "-L", str(r), str(r / "usr/bin/python3.11")]


def backend_of(folder: Path) -> str:
    from pit_export.runtimes.base import artifact_backend

    backend = artifact_backend(Path(folder))
    if backend is None:
        from pit_export.errors import BadInput

        raise BadInput(f"{folder}: not an artifact folder (no pit_export.json)")
    return backend


class EmulatedSession:
    """The artifact's Session running in the emulated ARM64 root (remote_runner.py, serve mode), behind the Session
    protocol: every prefill/decode/embed/unembed executes on the aarch64 runtime; arrays cross a pipe."""

    def __init__(self, folder: Path, threads: int = 1):
        from pit_export.runtimes.wire import recv

        folder = Path(folder)
        r = root(backend_of(folder))
        args = json.dumps({"mode": "serve", "folder": str(folder.resolve()), "threads": threads})
        self._err = tempfile.TemporaryFile(prefix="pit-emu-")
        self.proc = subprocess.Popen(
            [*guest_python(r), str(RUNNER), args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=guest_env(threads),
        )
        try:
            head, _ = recv(self.proc.stdout)
        except EOFError:
            self._dead("could not start")
        if "error" in head:
            self.close()
            raise Unavailable(f"arm64-emu: {folder}: {head['error']}")
        for k, v in head["ready"].items():
            setattr(self, k, v)
        self.name = f"{self.name} on emulated arm64"

    def _dead(self, what: str):
        self.proc.kill()
        self.proc.wait()
        self._err.seek(0)
        tail = self._err.read().decode(errors="replace").strip().splitlines() or [f"exit {self.proc.returncode}"]
        raise PitError(f"arm64-emu: the emulated runtime {what}: {tail[-1]}")

    def _call(self, op: str, arr=None, **kw):
        from pit_export.runtimes.wire import recv, send

        if self.proc.poll() is not None:
            self._dead("has exited")
        try:
            send(self.proc.stdin, {"op": op} | kw, arr)
            head, out = recv(self.proc.stdout)
        except (EOFError, BrokenPipeError):
            self._dead(f"died during {op}")
        if "error" in head:
            raise PitError(f"arm64-emu: {op}: {head['error']}")
        return out

    def prefill(self, tokens, start_pos, last_only=False):
        return self._call("prefill", np.asarray(tokens, dtype=np.int64), start=int(start_pos), last=bool(last_only))

    def decode(self, token, pos):
        return self._call("decode", token=int(token), pos=int(pos))

    def embed(self, tokens):
        return self._call("embed", np.asarray(tokens, dtype=np.int64))

    def unembed(self, hidden):
        return self._call("unembed", np.asarray(hidden, dtype=np.float32))

    def reset(self):
        self._call("reset")

    def close(self):
        if self.proc.poll() is None:
            try:
                from pit_export.runtimes.wire import send

                send(self.proc.stdin, {"op": "close"})
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()
        self._err.close()


def open_session(folder, threads: int | None = 1, **_):
    """An artifact's Session on the emulated ARM64 root, argument-checked like the host's."""
    from pit_export.runtimes.base import CheckedSession

    return CheckedSession(EmulatedSession(Path(folder), threads or 1))


def emulated_python(script: Path, arg: str, timeout: float, backend: str = "onnx", threads: int = 1) -> str:
    r = root(backend)
    p = subprocess.run(
        [*guest_python(r), str(script), arg], capture_output=True, text=True, env=guest_env(threads), timeout=timeout
    )
    if p.returncode != 0:
        raise PitError(f"arm64-emu: emulated runner failed: {(p.stderr.strip().splitlines() or ['no output'])[-1]}")
    return p.stdout.strip().splitlines()[-1]


def host_logits(folder: Path, prompt: np.ndarray, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The host runtime on the emulated run's exact tokens (not its own greedy choices)."""
    from pit_export.runtimes import open_session

    sess = open_session(folder, threads=1)
    pre = sess.prefill(prompt, 0, last_only=True)  # as the emulated run's timed_run
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


def count_plan(prompt_len: int, decode_steps: int) -> list[tuple[int, int]]:
    """The counting runs, (prompt tokens, decode steps), each one prefill then its decode steps in a fresh process:
    A = (1, 1), B = (P, 1), C = (P, 1 + g). Start-up, imports, program load and one-time setup cancel in the
    differences: prefill per token = (B - A) / (P - 1); decode per token = (C - B) / g at contexts P+1 .. P+g (the
    first decode step, which may re-plan for the one-token shape, is in both B and C)."""
    if prompt_len < 2 or decode_steps < 1:
        from pit_export.errors import BadInput

        raise BadInput(
            f"instruction counts need a prompt of >= 2 tokens and >= 1 decode step, got {prompt_len}, {decode_steps}"
        )
    return [(1, 1), (prompt_len, 1), (prompt_len, 1 + decode_steps)]


def per_token(counts: list[int], prompt_len: int, decode_steps: int, tool: str, isa: str) -> dict:
    a, b, c = counts
    return {
        f"{isa}_instructions_per_prefill_token": (b - a) / (prompt_len - 1),
        f"{isa}_instructions_per_decoded_token": (c - b) / decode_steps,
        "tool": tool,
        "context": prompt_len,
        "decode_contexts": [prompt_len + 1, prompt_len + decode_steps],
        "runs": [
            {"prompt": p, "decode_steps": g, "instructions": n}
            for (p, g), n in zip(count_plan(prompt_len, decode_steps), counts, strict=True)
        ],
        "threads": 1,
    }


def _count_args(folder: Path, prompt: np.ndarray, gen: int) -> str:
    return json.dumps({"mode": "count", "folder": str(folder.resolve()), "prompt": prompt.tolist(), "gen": gen})


def arm_instructions(folder: Path, vocab: int, prompt_len: int, decode_steps: int = 8, progress=lambda m: None) -> dict:
    """Executed ARM64 instructions per prefill token and per decoded token (QEMU TCG plugin, inline count; one
    thread): independent of emulation speed and machine load."""
    r = root(backend_of(folder))
    prompt, counts = prompt_tokens(prompt_len, vocab), []
    for n, gen in count_plan(prompt_len, decode_steps):
        progress(f"arm64 instruction count: prompt {n}, {gen} decode steps (emulated, counted: minutes)")
        cmd = [QEMU_PLUGGABLE, "-plugin", str(PLUGIN), "-L", str(r), str(r / "usr/bin/python3.11"), str(RUNNER)]
        p = subprocess.run(
            [*cmd, _count_args(folder, prompt[:n], gen)], capture_output=True, text=True, env=guest_env(), timeout=7200
        )
        m = re.search(r"insns: (\d+)", p.stderr)
        if p.returncode != 0 or m is None:
            return {"skipped": f"counting run failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}"}
        counts.append(int(m.group(1)))
    return per_token(counts, prompt_len, decode_steps, "QEMU TCG plugin (benchmarks/emu/insn_count.c)", "arm64")


def host_instructions(folder: Path, vocab: int, prompt_len: int, decode_steps: int = 8) -> dict:
    """Executed x86-64 instructions on the host (valgrind callgrind, all threads), same runner and plan: the
    fallback where ARM instructions cannot be counted. Not an ARM count."""
    if shutil.which("valgrind") is None:
        return {"skipped": "valgrind not installed"}
    prompt, counts = prompt_tokens(prompt_len, vocab), []
    with scratch_dir() as tmp:
        for n, gen in count_plan(prompt_len, decode_steps):
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out", sys.executable, str(RUNNER)]
            p = subprocess.run(
                [*cmd, _count_args(folder, prompt[:n], gen)],
                capture_output=True,
                text=True,
                timeout=7200,
                env=os.environ | {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"},
            )
            m = re.search(r"Collected : (\d+)", p.stderr)
            if p.returncode != 0 or m is None:
                return {"skipped": f"valgrind run failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}"}
            counts.append(int(m.group(1)))
    return per_token(counts, prompt_len, decode_steps, "valgrind callgrind (Ir)", "x86_64")


def instruction_counts(folder: Path, info: dict, prompt_len: int, decode_steps: int = 8, progress=lambda m: None):
    vocab = info["config"]["vocab_size"]
    why = qemu_plugins()
    if why is None:
        return {"arm64": arm_instructions(folder, vocab, prompt_len, decode_steps, progress)}
    return {"arm64": {"skipped": why}, "host": host_instructions(folder, vocab, prompt_len, decode_steps)}


def run(folder: Path, info: dict, cfg, progress=lambda msg: None) -> dict:
    backend = info["backend"]
    root(backend)
    vocab = info["config"]["vocab_size"]
    runs = []
    for threads in cfg.threads:
        for n in cfg.prompt_lens:
            progress(f"arm64-emu: threads={threads} prompt={n} gen={cfg.gen} x{cfg.repeats} (emulated: slow)")
            prompt = prompt_tokens(n, vocab)
            with scratch_dir() as tmp:
                args = _runner_args(folder, prompt, cfg.gen, f"{tmp}/logits.npz", threads, cfg.repeats)
                load = os.getloadavg()[0]
                res = json.loads(emulated_python(RUNNER, args, 7200, backend, threads))
                emu = np.load(f"{tmp}/logits.npz")
                pre, dec = host_logits(folder, prompt, emu["tokens"].tolist())
                runs.append(summarize(res, n, threads, load) | parity(emu, pre, dec, info["scheme"]))
    result = {"runs": runs, "emulator": {"qemu": QEMU, "cpu": QEMU_CPU, "root": str(EMU_ROOT)} | build_info()}
    if cfg.count_instructions:
        steps = min(cfg.gen, 8)
        result["instructions"] = instruction_counts(folder, info, min(cfg.prompt_lens), steps, progress)
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

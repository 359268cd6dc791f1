"""--where adb: run the artifact as an LLM on an attached Android device, with the runner its runtime ships for that,
and report what a deployment reads: prompt tokens/s, decode tokens/s, time to first token, load time, peak memory.

  .pte       ExecuTorch's LLM runner `llama_main` (examples/models/llama in the ExecuTorch tree), built for the device
             with the XNNPACK backend and the custom (llama::update_cache, llama::custom_sdpa) and quantized
             (embedding_4bit/8bit) ops; PIT_ADB_RUNNER names the binary on the host. It gets the artifact's
             tokenizer.json, the .ptd beside the .pte when there is one, a fixed prompt and greedy decoding, and
             prints its statistics (the PyTorchObserver JSON line and the RSS lines).
  onnx-cpu   onnxruntime-genai's `model_benchmark` (benchmark/c in the onnxruntime-genai tree), built for the device;
             PIT_ADB_GENAI_RUNNER names it (a binary, or a folder holding it with libonnxruntime*.so beside it).

Each run pushes the deployed files and the runner to /data/local/tmp/pit-bench, runs there, parses the runner's own
statistics and removes the folder, also when a step fails. Without adb, a device or a runner: exit 4, one line."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
from pathlib import Path

from pit_export.errors import Unavailable

REMOTE = "/data/local/tmp/pit-bench"
PROMPT = "def read_file(path):\n    with open(path) as f:\n"  # fixed; its token count is the artifact tokenizer's
TIMEOUT = 3600


def adb(*args: str, timeout: float = TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(["adb", *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"adb {' '.join(args[:3])}: no answer within {timeout:.0f} s") from None
    if check and p.returncode != 0:
        why = (p.stderr.strip() or p.stdout.strip()).splitlines() or [f"exit {p.returncode}"]
        raise Unavailable(f"adb {' '.join(args[:3])} failed: {why[-1]}")
    return p


def device() -> str:
    if shutil.which("adb") is None:
        raise Unavailable("adb not found: no Android device benchmark possible here")
    lines = [ln.split() for ln in adb("devices").stdout.splitlines()[1:] if ln.strip()]
    ready = [f[0] for f in lines if len(f) > 1 and f[1] == "device"]
    if not ready:
        raise Unavailable("no Android device attached (adb devices lists none ready)")
    return ready[0]


class Runner:
    """One on-device runner: which env var names it, what to push, the command line, how to read its output."""

    env, binary, what = "", "", ""

    def files(self, folder: Path, info: dict) -> list[Path]:
        return [folder / f for f in info["deploy_files"]]

    def command(self, remote_runner: str, info: dict, threads: int, prompt_len: int, cfg) -> list[str]:
        raise NotImplementedError

    def parse(self, text: str) -> dict:
        raise NotImplementedError


class LlamaMain(Runner):
    env, binary = "PIT_ADB_RUNNER", "llama_main"
    what = "ExecuTorch's llama_main built for the device with the custom and quantized ops (see pit_export/adb.py)"

    def files(self, folder: Path, info: dict) -> list[Path]:
        tok = folder / "tokenizer.json"
        if not tok.is_file():
            raise Unavailable(f"adb: {folder} has no tokenizer.json for the LLM runner")
        return [*super().files(folder, info), *([tok] if "tokenizer.json" not in info["deploy_files"] else [])]

    def command(self, remote_runner, info, threads, prompt_len, cfg):
        files = info["deploy_files"]
        pte = next(f for f in files if f.endswith(".pte"))
        ptd = next((f for f in files if f.endswith(".ptd")), None)
        cmd = [
            remote_runner,
            f"--model_path={REMOTE}/{pte}",
            f"--tokenizer_path={REMOTE}/tokenizer.json",
            f"--prompt={PROMPT}",
            f"--seq_len={prompt_len + cfg.gen}",  # prompt + generated tokens, as llama_main counts them
            "--temperature=0",
            f"--cpu_threads={threads}",
            "--warmup",
        ]
        return cmd + ([f"--data_path={REMOTE}/{ptd}"] if ptd else [])

    def parse(self, text: str) -> dict:
        return parse_llama_main(text)


class GenaiBenchmark(Runner):
    env, binary = "PIT_ADB_GENAI_RUNNER", "model_benchmark"
    what = "onnxruntime-genai's model_benchmark built for the device (see pit_export/adb.py)"

    def command(self, remote_runner, info, threads, prompt_len, cfg):
        lib = str(Path(remote_runner).parent)
        cmd = [f"LD_LIBRARY_PATH={lib}", remote_runner, "-i", REMOTE, "-e", "cpu", "--prompt", PROMPT]
        return cmd + ["-g", str(cfg.gen), "-r", str(cfg.repeats), "-w", "1"]

    def parse(self, text: str) -> dict:
        return parse_genai(text)


RUNNERS = {"executorch": LlamaMain(), "onnx": GenaiBenchmark()}


def parse_llama_main(text: str) -> dict:
    """llama_main's statistics: the PyTorchObserver JSON line (milliseconds since an epoch), and its RSS lines where
    the build prints them (they are ET_LOG lines: logcat, not stdout, on some Android builds)."""
    m = re.search(r"PyTorchObserver (\{.*\})", text)
    if m is None:
        raise Unavailable("adb: the LLM runner printed no statistics (no PyTorchObserver line)")
    s = json.loads(m.group(1))
    unit = s.get("SCALING_FACTOR_UNITS_PER_SECOND", 1000)
    ms = 1000 / unit
    prefill_ms = (s["prompt_eval_end_ms"] - s["inference_start_ms"]) * ms
    decode_ms = (s["inference_end_ms"] - s["prompt_eval_end_ms"]) * ms
    out = {
        "prompt_tokens": s["prompt_tokens"],
        "generated_tokens": s["generated_tokens"],
        "load_s": (s["model_load_end_ms"] - s["model_load_start_ms"]) * ms / 1000,
        "ttft_ms": (s["first_token_ms"] - s["inference_start_ms"]) * ms,
        "prefill_tok_s": s["prompt_tokens"] / prefill_ms * 1000 if prefill_ms > 0 else None,
        "decode_tok_s": s["generated_tokens"] / decode_ms * 1000 if decode_ms > 0 else None,
    }
    rss = [float(v) for v in re.findall(r"RSS after [^:]*: ([\d.]+) MiB", text)]
    out["peak_rss_mb"] = max(rss) * 1.048576 if rss and max(rss) > 0 else None  # MiB -> MB
    return out


def _stat(text: str, section: str, key: str) -> float | None:
    m = re.search(rf"{re.escape(section)}:\s*\n(?:\s*[^\n]*\n)*?\s*{re.escape(key)}:\s*([\d.eE+-]+)", text)
    return float(m.group(1)) if m else None


def parse_genai(text: str) -> dict:
    """onnxruntime-genai model_benchmark's report (averages over its repetitions)."""
    ttft_us = _stat(text, "Prompt processing (time to first token)", "avg (us)")
    if ttft_us is None:
        raise Unavailable("adb: model_benchmark printed no statistics")
    m = re.search(r"prompt tokens: (\d+)", text)
    peak = re.search(r"Peak working set size: (\d+) bytes", text)
    return {
        "prompt_tokens": int(m.group(1)) if m else None,
        "ttft_ms": ttft_us / 1000,
        "prefill_tok_s": _stat(text, "Prompt processing (time to first token)", "avg (tokens/s)"),
        "decode_tok_s": _stat(text, "Token generation", "avg (tokens/s)"),
        "peak_rss_mb": int(peak.group(1)) / 1e6 if peak else None,
    }


def prompt_len(folder: Path) -> int:
    """PROMPT's length in tokens under the artifact's tokenizer (the runner counts the same)."""
    from tokenizers import Tokenizer

    return len(Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PROMPT).ids)


def run(folder: Path, info: dict, cfg, progress=lambda msg: None) -> dict:
    serial = device()
    runner = RUNNERS.get(info["backend"])
    if runner is None:
        raise Unavailable(f"adb: no on-device runner for a {info['backend']} artifact (supported: .pte, onnx-cpu)")
    given = os.environ.get(runner.env)
    if not given or not Path(given).exists():
        raise Unavailable(f"adb: set {runner.env} to {runner.what}")
    given = Path(given)
    exe = given / runner.binary if given.is_dir() else given
    if not exe.is_file():
        raise Unavailable(f"adb: {runner.env}={given} holds no {runner.binary}")
    sh = ["-s", serial, "shell"]
    n_prompt = prompt_len(folder)
    if n_prompt + cfg.gen > info["config"]["max_seq_len"]:
        from pit_export.errors import BadInput

        raise BadInput(
            f"prompt ({n_prompt} tokens) + --gen {cfg.gen} exceeds the context {info['config']['max_seq_len']}"
        )
    runs = []
    try:
        progress(f"adb {serial}: push")
        adb(*sh, "rm", "-rf", REMOTE)
        adb(*sh, "mkdir", "-p", f"{REMOTE}/runner")
        for path in runner.files(folder, info):
            adb("-s", serial, "push", str(path), f"{REMOTE}/")
        for path in given.iterdir() if given.is_dir() else [given]:
            adb("-s", serial, "push", str(path), f"{REMOTE}/runner/")
        remote_exe = f"{REMOTE}/runner/{exe.name}"
        adb(*sh, "chmod", "755", remote_exe)
        for threads in cfg.threads:
            reps = 1 if isinstance(runner, GenaiBenchmark) else cfg.repeats  # model_benchmark repeats itself
            got = []
            for i in range(reps):
                progress(f"adb {serial}: {runner.binary} threads={threads} run {i + 1}/{reps}")
                cmd = shlex.join(runner.command(remote_exe, info, threads, n_prompt, cfg))
                p = adb(*sh, cmd, check=False)
                if p.returncode != 0:
                    tail = (p.stderr.strip() or p.stdout.strip()).splitlines() or [f"exit {p.returncode}"]
                    raise Unavailable(f"adb: {runner.binary} failed on the device: {tail[-1]}")
                got.append(runner.parse(p.stdout + "\n" + p.stderr))
            runs.append({"threads": threads, "runs": len(got)} | median_of(got))
        model = adb(*sh, "getprop", "ro.product.model").stdout.strip()
    finally:
        adb(*sh, "rm", "-rf", REMOTE, check=False)
    return {
        "device": {"serial": serial, "model": model},
        "runner": {"name": runner.binary, "path": str(exe), "prompt": PROMPT, "prompt_tokens": n_prompt},
        "runs": runs,
    }


def median_of(stats: list[dict]) -> dict:
    out = {}
    for k in stats[0]:
        vals = [s[k] for s in stats if s.get(k) is not None]
        out[k] = statistics.median(vals) if vals else None
    return out

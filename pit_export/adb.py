"""--where adb: time the deployed program on an attached Android device with an on-device runner.

The device needs a runner binary built for it (ExecuTorch's `executor_runner` with the XNNPACK backend, from an
ExecuTorch Android build); PIT_ADB_RUNNER names it on the host. Without adb, a device or a runner: exit 4, nothing
is faked. This path could not be exercised on the machine it was written on (no device)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from pit_export.errors import Unavailable

REMOTE = "/data/local/tmp/pit-bench"
# deployed file suffix -> (runner command on the device, pattern of its timing line: runs, total ms)
RUNNERS = {
    ".pte": (
        "{runner} --model_path {remote}/{program} --num_executions {n}",
        r"executed successfully (\d+) time\(s\) in ([\d.]+) ms",
    ),
}


def adb(*args: str, timeout: float = 600) -> str:
    p = subprocess.run(["adb", *args], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise Unavailable(f"adb {' '.join(args[:2])} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    return p.stdout


def device() -> str:
    if shutil.which("adb") is None:
        raise Unavailable("adb not found: no Android device benchmark possible here")
    lines = [ln.split() for ln in adb("devices").splitlines()[1:] if ln.strip()]
    ready = [f[0] for f in lines if len(f) > 1 and f[1] == "device"]
    if not ready:
        raise Unavailable("no Android device attached (adb devices lists none ready)")
    return ready[0]


def run(folder: Path, info: dict, cfg, progress=lambda msg: None) -> dict:
    serial = device()
    program = next((f for f in info["deploy_files"] if Path(f).suffix in RUNNERS), None)
    if program is None:
        files = ", ".join(info["deploy_files"])
        raise Unavailable(f"adb: no on-device runner for {files} (supported: {', '.join(RUNNERS)})")
    runner = os.environ.get("PIT_ADB_RUNNER")
    if not runner or not Path(runner).is_file():
        raise Unavailable("adb: set PIT_ADB_RUNNER to an ExecuTorch executor_runner built for the device")
    progress(f"adb {serial}: push")
    adb("-s", serial, "shell", "mkdir", "-p", REMOTE)
    for path in [*(folder / f for f in info["deploy_files"]), Path(runner)]:
        adb("-s", serial, "push", str(path), REMOTE)
    cmd, pattern = RUNNERS[Path(program).suffix]
    remote_runner = f"{REMOTE}/{Path(runner).name}"
    adb("-s", serial, "shell", "chmod", "+x", remote_runner)
    progress(f"adb {serial}: run")
    text = adb("-s", serial, "shell", cmd.format(runner=remote_runner, remote=REMOTE, program=program, n=cfg.repeats))
    m = re.search(pattern, text)
    if m is None:
        raise Unavailable(f"adb: runner output had no timing line ({text.strip().splitlines()[-1:]})")
    runs, total_ms = int(m.group(1)), float(m.group(2))
    model = adb("-s", serial, "shell", "getprop", "ro.product.model").strip()
    return {
        "device": {"serial": serial, "model": model},
        # the runner feeds its default inputs (forward at its largest input shape): a per-forward time, not tok/s
        "runs": [{"runner_forward_ms": total_ms / runs, "executions": runs}],
    }

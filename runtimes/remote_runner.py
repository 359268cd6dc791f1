"""Standalone runner for another Python (the emulated ARM64 one): imports only numpy, onnxruntime and this package's
torch-free modules (timing, onnxruntime session), never torch or pit_export. Times greedy runs and keeps the logits
of the last run so the host can check them against its own runtime on the same tokens.

    python3 remote_runner.py '{"folder": ..., "threads": 1, "prompt": [...], "gen": 8, "repeats": 1, "out": "x.npz"}'
"""

import json
import sys
from pathlib import Path

# not this folder (its onnxruntime.py would shadow the real onnxruntime) but the one holding the package
sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402

from runtimes import timing  # noqa: E402
from runtimes.onnxruntime import OrtSession  # noqa: E402


def main(args: dict) -> dict:
    import time

    t0 = time.perf_counter()
    sess = OrtSession(args["folder"], threads=args["threads"])
    load = time.perf_counter() - t0
    prompt = np.asarray(args["prompt"], dtype=np.int64)
    timing.timed_run(sess, prompt, min(args["gen"], 2))  # warm-up
    runs = [timing.timed_run(sess, prompt, args["gen"], keep_logits=True) for _ in range(args["repeats"])]
    last = runs[-1]
    np.savez(args["out"], prefill=last["prefill_logits"], decode=last["decode_logits"], tokens=last["tokens"])
    assert "torch" not in sys.modules and "pit_export" not in sys.modules  # this runner must stay torch-free
    return {"load_s": load, "runs": [{k: r[k] for k in ("ttft", "steps", "tokens")} for r in runs]}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))

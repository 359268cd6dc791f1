"""Standalone runner for another Python (the emulated ARM64 one): the artifact's own Session class (ONNX Runtime or
ExecuTorch), numpy in and out, and nothing of pit-export beyond that class and its light helpers (no checkpoint
loading, no torch for ONNX). Three modes, one JSON argument:

    python3 remote_runner.py '{"folder": ..., "threads": 1, "prompt": [...], "gen": 8, "repeats": 1, "out": "x.npz"}'
        times greedy runs and keeps the logits of the last one (the host checks them on the same tokens)
    python3 remote_runner.py '{"mode": "count", "folder": ..., "prompt": [...], "gen": 4}'
        one prefill and `gen` decode steps, no warm-up: the executed-instruction count of exactly that
    python3 remote_runner.py '{"mode": "serve", "folder": ..., "threads": 1}'
        a Session served over stdin/stdout (length-prefixed frames, see serve()), so the host runs validation and
        generation unchanged against the artifact executing here
"""

import json
import os
import sys
import types
from pathlib import Path

# not this folder (its onnxruntime.py would shadow the real onnxruntime) but the one holding the runtimes package
HERE = Path(__file__).resolve().parent
sys.path[0] = str(HERE.parent)
# the package's light helpers (pit_export.memory) as `pit_export`, without the host's site-packages on the path: in a
# source tree pit_export/ sits beside runtimes/, in an installed wheel runtimes/ is inside it
_pkg = types.ModuleType("pit_export")
_pkg.__path__ = [str(HERE.parent / "pit_export" if (HERE.parent / "pit_export").is_dir() else HERE.parent)]
sys.modules.setdefault("pit_export", _pkg)

import numpy as np  # noqa: E402

from runtimes import timing  # noqa: E402
from runtimes.wire import recv, send  # noqa: E402


def open_session(folder: str, threads: int):
    backend = json.loads((Path(folder) / "pit_export.json").read_text())["backend"]
    if backend == "onnx":
        from runtimes.onnxruntime import OrtSession

        return OrtSession(folder, threads=threads)
    if backend == "executorch":
        import torch  # noqa: F401  ExecuTorch's Python runtime links libtorch

        from runtimes.executorch import ExecuTorchSession

        return ExecuTorchSession(Path(folder), threads)
    raise SystemExit(f"remote runner: no {backend} runtime in this root")


def bench(args: dict) -> dict:
    import time

    t0 = time.perf_counter()
    sess = open_session(args["folder"], args["threads"])
    load = time.perf_counter() - t0
    prompt = np.asarray(args["prompt"], dtype=np.int64)
    timing.timed_run(sess, prompt, min(args["gen"], 2))  # warm-up
    runs = [timing.timed_run(sess, prompt, args["gen"], keep_logits=True) for _ in range(args["repeats"])]
    last = runs[-1]
    np.savez(args["out"], prefill=last["prefill_logits"], decode=last["decode_logits"], tokens=last["tokens"])
    assert "pit_export.models" not in sys.modules  # this runner never loads checkpoints or the training graph
    return {"load_s": load, "runs": [{k: r[k] for k in ("ttft", "steps", "tokens")} for r in runs]}


def count(args: dict) -> dict:
    """Exactly one prefill of the prompt and `gen` greedy decode steps: the instruction counter's workload."""
    sess = open_session(args["folder"], 1)
    prompt = np.asarray(args["prompt"], dtype=np.int64)
    tok = int(np.argmax(sess.prefill(prompt, 0, last_only=True)[-1]))
    for i in range(args["gen"]):
        tok = int(np.argmax(sess.decode(tok, len(prompt) + i)))
    return {"last_token": tok}


def serve(args: dict) -> None:
    # replies go to the original stdout only; anything a native library prints goes to stderr instead
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = os.fdopen(0, "rb")
    try:
        sess = open_session(args["folder"], args.get("threads", 1))
    except Exception as e:  # reported to the host as one line, which raises it there
        send(out, {"error": f"{type(e).__name__}: {e}".splitlines()[0]})
        return
    attrs = ("name", "vocab_size", "hidden_size", "max_seq_len", "scheme", "layout")
    send(out, {"ready": {a: getattr(sess, a) for a in attrs if hasattr(sess, a)}})
    while True:
        try:
            head, arr = recv(inp)
        except EOFError:
            break
        op = head["op"]
        try:
            if op == "prefill":
                res = sess.prefill(arr, head["start"], last_only=head.get("last", False))
            elif op == "decode":
                res = sess.decode(head["token"], head["pos"])
            elif op in ("embed", "unembed"):
                res = getattr(sess, op)(arr)
            elif op == "reset":
                sess.reset()
                res = None
            elif op == "close":
                sess.close()
                send(out, {"ok": True})
                break
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:
            send(out, {"error": f"{type(e).__name__}: {e}".splitlines()[0]})
            continue
        send(out, {"ok": True}, None if res is None else np.asarray(res))


if __name__ == "__main__":
    a = json.loads(sys.argv[1])
    mode = a.get("mode", "bench")
    if mode == "serve":
        serve(a)
    else:
        print(json.dumps(count(a) if mode == "count" else bench(a)))

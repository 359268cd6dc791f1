"""Guest side of count_peers.py, run by the emulated aarch64 Python under the counting plugin: opens one artifact the
way benchmarks/peer_runner.py does (an ExecuTorch .pte's forward(tokens, positions), or an onnxruntime-genai folder
through og.Generator), then exactly one prefill of the prompt and `gen` greedy decode steps.

    python3 peer_count.py '{"kind": "pte" | "genai", "path": ..., "data": null, "vocab": V, "prompt": [...], "gen": 4}'
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

spec = importlib.util.spec_from_file_location("peer_runner", Path(__file__).resolve().parents[1] / "peer_runner.py")
peer_runner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer_runner)


def main(a: dict) -> dict:
    prompt = np.asarray(a["prompt"], dtype=np.int64)
    if a["kind"] == "pte":
        sess = peer_runner.PteSession(a["path"], 1, a.get("data"))
    else:
        sess = peer_runner.GenaiSession(a["path"], 1, len(prompt) + a["gen"] + 1)
        sess.vocab = a["vocab"]
    sess.reset()
    tok = int(np.argmax(sess.prefill(prompt, 0, last_only=True)[-1]))
    for i in range(a["gen"]):
        tok = int(np.argmax(sess.decode(tok, len(prompt) + i)))
    return {"last_token": tok}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))

"""Times one artifact in one (threads, prompt length) configuration, inside a peer's venv: numpy and the runtime only,
never pit_export. The loop is runtimes/timing.py's, the one `pit-export bench` uses: fixed pseudo-random prompt ids,
prefill, then greedy decode steps with numpy's argmax over the last position's fp32 logits; one warm-up run, medians
over the measured runs. Prints one JSON line with the fields of pit_export.bench.RunStats.

    python peer_runner.py '{"kind": "pte", "path": "model.pte", "vocab": 49152, "threads": 1, "prompt_len": 64,
                            "gen": 64, "repeats": 5}'

kind "pte": an ExecuTorch program whose forward takes (tokens Long[1,T], positions Long[T]) and returns the logits of
every position (optimum-executorch's and ours). kind "genai": an onnxruntime-genai folder through og.Generator
(append_tokens + get_logits); "native": true times generate_next_token instead (genai's own greedy search in C++)."""

import json
import os
import statistics
import sys
import time
from pathlib import Path

# the folder holding the repo's runtimes package (timing.py is numpy-only), not this one
sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402

from runtimes.timing import prompt_tokens, timed_run  # noqa: E402


def rss_kb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


class PteSession:
    """The same calls as runtimes/executorch.py's session: Runtime.load_program, forward.execute, .numpy()."""

    def __init__(self, path: str, threads: int, data: str | None = None):
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  custom sdpa / KV-cache update ops
        import executorch.kernels.quantized  # noqa: F401  quantized embedding kernels
        import torch
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        self.torch = torch
        _unsafe_reset_threadpool(threads)
        self.program = Runtime.get().load_program(path, data_path=data)
        self.forward = self.program.load_method("forward")

    def reset(self):
        pass  # both programs mask or skip cache slots past the current position

    def prefill(self, tokens, start_pos, last_only=False):
        t = self.torch.as_tensor(np.asarray(tokens), dtype=self.torch.long)
        pos = self.torch.arange(start_pos, start_pos + len(t))
        logits = self.forward.execute([t[None], pos])[0].numpy()[0]
        return logits[-1:] if last_only else logits

    def decode(self, token, pos):
        return self.prefill(np.array([token]), pos, last_only=True)[0]


class GenaiSession:
    """og.Generator per run (created in reset, outside the timed part); threads through the config's session
    options. append_tokens runs the model; get_logits gives the last position's logits."""

    def __init__(self, path: str, threads: int, max_length: int):
        import onnxruntime_genai as og

        self.og, self.max_length = og, max_length
        cfg = og.Config(path)
        opts = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
        self.model = og.Model(cfg)
        self.gen = None

    def reset(self):
        self.gen = None  # free the previous KV buffers first
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, do_sample=False)
        self.gen = self.og.Generator(self.model, params)

    def prefill(self, tokens, start_pos, last_only=False):  # genai returns the last position's logits
        self.gen.append_tokens(np.asarray(tokens, dtype=np.int32)[None])
        return np.asarray(self.gen.get_logits()).reshape(-1, self.vocab)

    def decode(self, token, pos):
        return self.prefill([token], pos)[-1]


def native_run(sess: GenaiSession, prompt: np.ndarray, gen: int) -> dict:
    """genai's own loop: append_tokens(prompt) + the first generate_next_token, then `gen` generate_next_token calls
    (each runs the model on the last token and picks the next one in C++)."""
    sess.reset()
    g = sess.gen
    t0 = time.perf_counter()
    g.append_tokens(prompt.astype(np.int32)[None])
    g.generate_next_token()
    tokens = [int(g.get_next_tokens()[0])]
    ttft = time.perf_counter() - t0
    steps = []
    for _ in range(gen):
        t = time.perf_counter()
        g.generate_next_token()
        tokens.append(int(g.get_next_tokens()[0]))
        steps.append(time.perf_counter() - t)
    return {"ttft": ttft, "steps": steps, "tokens": tokens}


def pte_op_profile(path: str, vocab: int, threads: int, prompt_len: int, steps: int = 16) -> dict:
    """Share of decode time per operator from an ETDump (portable kernels and XNNPACK ops; the same reading as
    runtimes/executorch.py's op_profile): prefill, 2 warm-up steps, then `steps` traced steps."""
    import re
    import tempfile

    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401
    import torch
    from executorch.devtools import Inspector
    from executorch.extension.pybindings.portable_lib import _load_for_executorch, _unsafe_reset_threadpool

    _unsafe_reset_threadpool(threads)
    module = _load_for_executorch(path, None, True)
    tokens = torch.as_tensor(prompt_tokens(prompt_len, vocab))
    logits = module.run_method("forward", (tokens[None], torch.arange(prompt_len)))[0]
    tok = int(logits[0, -1].argmax())
    for i in range(2 + steps):
        pos = prompt_len + i
        tok = int(module.run_method("forward", (torch.tensor([[tok]]), torch.tensor([pos])))[0][0, -1].argmax())
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        module.write_etdump_result_to_file(f"{tmp}/forward.etdp")
        for block in Inspector(etdump_path=f"{tmp}/forward.etdp").event_blocks:
            for e in block.events if block.name == "Execute" else []:
                if e.perf_data is None or e.name in ("Method::execute", "OPERATOR_CALL", "DELEGATE_CALL"):
                    continue
                name = re.sub(r" #\d+$", "", e.name).removeprefix("native_call_")
                out[name] = out.get(name, 0.0) + 1e3 * sum(e.perf_data.raw[3:])  # skip prefill + warm-up
    total = sum(out.values()) or 1.0
    return {k: v / total for k, v in sorted(out.items(), key=lambda kv: -kv[1])[:12]}


def main(args: dict) -> dict:
    if args.get("profile"):
        return {"ops_share": pte_op_profile(args["path"], args["vocab"], args["threads"], args["prompt_len"])}
    load_avg = os.getloadavg()[0]
    base = rss_kb("VmRSS")
    n, gen, repeats = args["prompt_len"], args["gen"], args["repeats"]
    t0 = time.perf_counter()
    if args["kind"] == "pte":
        sess = PteSession(args["path"], args["threads"], args.get("data"))
    else:
        sess = GenaiSession(args["path"], args["threads"], n + gen + 1)
        sess.vocab = args["vocab"]
    load_s = time.perf_counter() - t0
    run = native_run if args.get("native") else timed_run
    prompt = prompt_tokens(n, args["vocab"])
    run(sess, prompt, min(gen, 4))  # warm-up
    runs = [run(sess, prompt, gen) for _ in range(repeats)]
    peak = rss_kb("VmHWM")
    return speed(runs, args) | {
        "load_s": load_s,
        "peak_rss_mb": peak / 1024,
        "base_rss_mb": base / 1024,
        "session_rss_mb": (peak - base) / 1024,
        "loadavg_1m": load_avg,
    }


def speed(runs: list[dict], args: dict) -> dict:
    """The timing fields of a record from runs ({ttft, steps, tokens} each): medians over the runs, step
    percentiles over all their steps, and whether every run chose the same tokens."""
    n, steps = args["prompt_len"], [s for r in runs for s in r["steps"]]
    return {
        "threads": args["threads"],
        "prompt_len": n,
        "gen": args["gen"],
        "repeats": args["repeats"],
        "prefill_tok_s": statistics.median(n / r["ttft"] for r in runs),
        "decode_tok_s": statistics.median(len(r["steps"]) / sum(r["steps"]) for r in runs),
        "decode_tok_s_p50": 1 / float(np.percentile(steps, 50)),
        "ttft_ms": 1e3 * statistics.median(r["ttft"] for r in runs),
        "step_p50_ms": 1e3 * float(np.percentile(steps, 50)),
        "step_p90_ms": 1e3 * float(np.percentile(steps, 90)),
        "first_token": runs[0]["tokens"][0],
        "tokens_same_every_run": all(r["tokens"] == runs[0]["tokens"] for r in runs),
    }


def paired(args: dict) -> dict:
    """Two genai folders in one process, genai's own loop, their work interleaved: per repeat both prefill (in turn),
    then decode step i of one and step i of the other back to back, so a change in the host's speed falls on both
    within milliseconds. Returns {"a": record, "b": record} with main()'s timing fields (no memory fields: one
    process holds both) and "step_ratios": per timed run, a's speed over b's for each pair of neighbouring steps."""
    n, gen, repeats, threads = args["prompt_len"], args["gen"], args["repeats"], args["threads"]
    sess = {k: GenaiSession(args[k], threads, n + gen + 1) for k in ("a", "b")}
    prompt = prompt_tokens(n, args["vocab"])
    runs = {k: [] for k in sess}
    for r in range(repeats + 1):  # the first is the warm-up
        order = list(sess) if r % 2 == 0 else list(sess)[::-1]
        ttft, steps, tokens = {}, {k: [] for k in sess}, {}
        for k in order:
            sess[k].reset()
            g = sess[k].gen
            t0 = time.perf_counter()
            g.append_tokens(prompt.astype(np.int32)[None])
            g.generate_next_token()
            ttft[k], tokens[k] = time.perf_counter() - t0, [int(g.get_next_tokens()[0])]
        for i in range(gen):
            for k in order if i % 2 == 0 else order[::-1]:  # which one steps first alternates step by step
                g = sess[k].gen
                t = time.perf_counter()
                g.generate_next_token()
                steps[k].append(time.perf_counter() - t)
                tokens[k].append(int(g.get_next_tokens()[0]))
        if r:
            for k in sess:
                runs[k].append({"ttft": ttft[k], "steps": steps[k], "tokens": tokens[k]})
    out = {k: speed(rs, args) | {"loadavg_1m": os.getloadavg()[0]} for k, rs in runs.items()}
    # a's speed over b's, step by step: each b step over the a step taken next to it (decode step i of both)
    pairs = zip(runs["a"], runs["b"], strict=True)
    out["step_ratios"] = [[tb / ta for ta, tb in zip(ra["steps"], rb["steps"], strict=True)] for ra, rb in pairs]
    return out


if __name__ == "__main__":
    _args = json.loads(sys.argv[1])
    print(json.dumps(paired(_args) if _args.get("kind") == "genai-paired" else main(_args)))

"""Markdown from the measurement JSON in benchmarks/results/: one <name>.md beside each <name>.json.

    .venv/bin/python benchmarks/render.py                 # every benchmarks/results/*.json
    .venv/bin/python benchmarks/render.py PATH.json ...   # only these
    .venv/bin/python benchmarks/render.py --check         # exit 1 if a .md is missing or differs from its JSON

Importable: `render(name, data) -> str` (the markdown for one parsed JSON), `render_file(path) -> Path` (writes it),
`main(argv)`. The output depends on the JSON alone (no clock, no machine lookups, no network), so a rerun writes the
same bytes. Every number in a .md is a JSON value; the only arithmetic is unit conversion (bytes to MB, 10^6) and the
ratios a column header names. The JSON's own field names are given so a reader can find each value.

Recognised shapes: an artifact table (a list of rows from benchmarks/artifacts.py), a `pit-export bench` result (host
or arm64-emu), the peers comparison (benchmarks/peers.py) and the scale run (benchmarks/scale.py); any other JSON is
rendered as a flat table of its scalar values.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DASH = "–"


# ---------------------------------------------------------------- formatting


def num(v, spec: str = ".4g") -> str:
    """A JSON value for a table cell: None as a dash, booleans as yes/no, numbers with `spec`."""
    if v is None:
        return DASH
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int | float):
        return format(v, spec)
    return cell(v)


def value(v) -> str:
    """Any JSON value in a field/value table: integers with thousands separators, floats to 4 digits, lists joined."""
    if isinstance(v, list):
        return ", ".join(value(x) for x in v) or DASH
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return num(v, ".4g")


def mb(nbytes, spec: str = ".2f") -> str:
    return DASH if nbytes is None else format(nbytes / 1e6, spec)


def cell(v) -> str:
    """Text for a table cell: pipes escaped, newlines flattened."""
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return out


def kv_table(pairs: list[tuple[str, object]], head: tuple[str, str] = ("item", "value")) -> list[str]:
    return table(list(head), [[k, v] for k, v in pairs])


def banner(name: str, title: str) -> list[str]:
    return [
        f"# {title}",
        "",
        f"_Generated from [{name}.json]({name}.json) by `benchmarks/render.py`; do not edit: rerun "
        "`.venv/bin/python benchmarks/render.py`._",
        "",
    ]


def machine_lines(m: dict | None) -> list[str]:
    if not m:
        return []
    load = m.get("loadavg")
    pairs = [
        ("cpu", m.get("cpu", DASH)),
        ("arch", m.get("arch", DASH)),
        ("cores (usable by the process)", f"{m.get('cores', DASH)} ({m.get('affinity_cores', DASH)})"),
        ("python", m.get("python", DASH)),
        ("os", m.get("os", DASH)),
    ]
    if load:
        pairs.append(("load average 1 / 5 / 15 min (`machine.loadavg`)", " / ".join(num(x, ".2f") for x in load)))
    return ["## Machine", "", *kv_table(pairs), ""]


def model_line(cfg: dict | None) -> str:
    if not cfg:
        return DASH
    return (
        f"vocab {cfg.get('vocab_size')}, d {cfg.get('dim')}, {cfg.get('n_layers')} layers, "
        f"{cfg.get('n_heads')}/{cfg.get('n_kv_heads')} heads, ffn {cfg.get('ffn_dim')}, "
        f"context {cfg.get('max_seq_len')}, tying {cfg.get('tying')}"
    )


def share_rows(shares: dict, us: dict | None = None, top: int | None = None) -> list[list]:
    """Op shares, largest first (ties by name): [op, µs per step, share %]."""
    items = sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))
    if top is not None:
        items = items[:top]
    return [[op, num((us or {}).get(op), ".1f"), num(100 * s, ".1f")] for op, s in items]


# ---------------------------------------------------------------- artifact tables (benchmarks/artifacts.py)

ARTIFACT_COLS = [
    ("max_abs_logit", "max \\|Δlogit\\|", ".3g"),
    ("top1", "top-1", ".4f"),
    ("kl_mean", "KL mean", ".2g"),
    ("kl_p99", "KL p99", ".2g"),
    ("ppl_ratio", "ppl ratio", ".4f"),
    ("interface_err_max", "W·E − I max", ".2g"),
    ("greedy_agree", "greedy agree", ".3f"),
]


def cells(r: dict, cols) -> list[str]:
    """One table row: r's value of each (key, header, format) column."""
    return [num(r.get(k), spec) for k, _, spec in cols]


# what validated the rows of each target's artifact table
RUNTIMES = {
    "android": "the ExecuTorch runtime (XNNPACK)",
    "onnx-cpu": "ONNX Runtime",
    "ios": "the project's numpy evaluator of the saved MIL program (not the CoreML runtime, which needs macOS)",
}


def is_artifact_table(data) -> bool:
    return isinstance(data, list) and bool(data) and all(isinstance(r, dict) and "model_bytes" in r for r in data)


def render_artifacts(name: str, rows: list[dict]) -> str:
    genai = any(r.get("genai_agree") is not None for r in rows)
    lines = banner(name, f"{name}: size and parity per model × layout × scheme")
    lines += [
        f"Written by `benchmarks/artifacts.py --target {name}`: every row is an artifact exported for this target and "
        f"validated through {RUNTIMES.get(name, 'its own runtime')} against the training graph. "
        "MB = `model_bytes` (the deployed files) / 10^6; "
        "export s = `export_wall_s`; passed = every gate of the scheme held (`passed`). greedy agree is the fraction "
        "of greedy tokens identical to the training graph's"
        + (
            "; genai = onnxruntime-genai's greedy tokens equal our ORT session's on the same artifact."
            if genai
            else "."
        ),
        "",
    ]
    header = ["model", "layout", "scheme", "MB", "export s", "passed", *(h for _, h, _ in ARTIFACT_COLS)]
    header += ["genai"] if genai else []
    body = []
    for r in rows:
        row = [r.get("model"), r.get("layout"), r.get("scheme"), mb(r.get("model_bytes")), num(r.get("export_wall_s"))]
        row.append("yes" if r.get("passed") else "**no**")
        row += cells(r, ARTIFACT_COLS)
        if genai:
            row.append(num(r.get("genai_agree")))
        body.append(row)
    return "\n".join(lines + table(header, body)) + "\n"


# ---------------------------------------------------------------- `pit-export bench` results


def is_bench(data) -> bool:
    return isinstance(data, dict) and "runs" in data and "where" in data and "artifact" in data


def artifact_lines(a: dict) -> list[str]:
    files = ", ".join(f"{f} ({mb(b)} MB)" for f, b in sorted((a.get("deploy_files") or {}).items()))
    pairs = [
        ("target / backend", f"{a.get('target')} / {a.get('backend')}"),
        ("scheme, layout", f"{a.get('scheme')}, {a.get('layout')}"),
        ("deployed MB (`deployed_bytes`)", mb(a.get("deployed_bytes"))),
        ("deployed files", files or DASH),
        ("model", model_line(a.get("model"))),
    ]
    return ["## Artifact", "", *kv_table(pairs), ""]


def config_lines(c: dict | None) -> list[str]:
    if not c:
        return []
    pairs = [
        ("threads", ", ".join(map(str, c.get("threads", [])))),
        ("prompt lengths", ", ".join(map(str, c.get("prompt_lens", [])))),
        ("decode steps (`gen`)", num(c.get("gen"))),
        ("measured runs per configuration (`repeats`)", num(c.get("repeats"))),
        ("instruction count", num(c.get("count_instructions"))),
    ]
    return ["## Configuration", "", *kv_table(pairs), ""]


HOST_COLS = [
    ("prefill_tok_s", "prefill tok/s", ".0f"),
    ("ttft_ms", "TTFT ms", ".2f"),
    ("decode_tok_s", "decode tok/s", ".0f"),
    ("decode_tok_s_p50", "decode tok/s, 1 / median step", ".0f"),
    ("step_p50_ms", "step p50 ms", ".3f"),
    ("step_p90_ms", "step p90 ms", ".3f"),
    ("load_s", "load s", ".2f"),
    ("peak_rss_mb", "peak RSS MiB", ".0f"),
    ("base_rss_mb", "interpreter RSS MiB", ".0f"),
    ("session_rss_mb", "session RSS MiB", ".0f"),
    ("loadavg_1m", "load 1m", ".2f"),
]


def host_runs(runs: list[dict]) -> list[str]:
    header = ["threads", "prompt", *(h for _, h, _ in HOST_COLS)]
    rows = []
    for r in runs:
        head = [r.get("threads"), r.get("prompt_len")]
        if "error" in r:
            rows.append([*head, f"error: {r['error']}", *[""] * (len(HOST_COLS) - 1)])
        else:
            rows.append([*head, *cells(r, HOST_COLS)])
    return [
        "## Runs",
        "",
        "Medians over the measured runs (`runs[]`). decode tok/s = decode steps / their total time; the next column is "
        "1 / the median step (`decode_tok_s_p50`), less sensitive to other processes. Peak RSS (`VmHWM`) is the "
        "whole bench process: interpreter and imports (`base_rss_mb`) plus what the session added (`session_rss_mb`). "
        "load 1m = the host's 1-minute load average when the configuration ran.",
        "",
        *table(header, rows),
        "",
    ]


def bandwidth_lines(b: dict | None) -> list[str]:
    if not b:
        return []
    pairs = [
        ("read GB/s (`read_gbs`)", num(b.get("read_gbs"), ".1f")),
        ("copy GB/s (`copy_gbs`)", num(b.get("copy_gbs"), ".1f")),
        ("array MB, threads", f"{num(b.get('array_mb'))}, {num(b.get('threads'))}"),
        ("load 1m", num(b.get("loadavg_1m"), ".2f")),
    ]
    return ["## Host memory bandwidth", "", *kv_table(pairs), ""]


def roofline_lines(roof: list[dict] | None) -> list[str]:
    if not roof:
        return []
    header = [
        "threads",
        "prompt",
        "context",
        "streamed B",
        "gather tables B",
        "gathered row B",
        "KV read B",
        "bytes / token",
        "host roofline tok/s",
        "host decode tok/s",
        "fraction of roofline",
    ]
    rows, phones, formula, label = [], [], None, None
    for r in roof:
        b = r.get("bytes_per_token", {})
        formula = formula or b.get("formula")
        label = label or r.get("label")
        rows.append(
            [
                r.get("threads"),
                r.get("prompt_len"),
                num(b.get("context")),
                num(b.get("streamed"), "d"),
                num(b.get("gather_tables"), "d"),
                num(b.get("gather_row"), "d"),
                num(b.get("kv_read"), "d"),
                num(b.get("total"), "d"),
                num(r.get("host_roofline_tok_s"), ".0f"),
                num(r.get("host_decode_tok_s"), ".0f"),
                num(r.get("host_roofline_fraction"), ".3f"),
            ]
        )
        for phone, p in (r.get("phones_projected") or {}).items():
            phones.append(
                [
                    r.get("threads"),
                    r.get("prompt_len"),
                    phone,
                    num(p.get("bandwidth_gbs"), ".0f"),
                    num(p.get("roofline_tok_s"), ".0f"),
                    num(p.get("at_host_efficiency_tok_s"), ".0f"),
                    p.get("note", ""),
                ]
            )
    out = ["## Bytes per decoded token and roofline", ""]
    if formula:
        out += [f"`bytes/token = {formula}`", ""]
    out += [*table(header, rows), ""]
    if phones:
        out += [
            "### Phone projections",
            "",
            f"**{label or 'PROJECTION'}.** Roofline = assumed bandwidth / bytes per token; the last number scales it "
            "by the host's fraction of its own roofline.",
            "",
            *table(
                [
                    "threads",
                    "prompt",
                    "profile",
                    "GB/s",
                    "roofline tok/s",
                    "at host efficiency tok/s",
                    "profile note",
                ],
                phones,
            ),
            "",
        ]
    return out


def profile_lines(p: dict | None, top: int | None = None, heading: str = "## Where decode time goes") -> list[str]:
    if not p:
        return []
    out = [heading, ""]
    head = [f"threads {num(p.get('threads'))}", f"context {num(p.get('context'))}"]
    if "steps" in p:
        head.append(f"{num(p.get('steps'))} traced steps")
    if "step_us" in p:
        head.append(f"{num(p.get('step_us'), '.1f')} µs per traced step")
    out += [", ".join(head) + ". Shares of the runtime's own per-op trace (`ops_share`); tracing adds overhead.", ""]
    if p.get("ops_share"):
        rows = share_rows(p["ops_share"], p.get("ops_us_per_step"), top)
        if top is not None and len(p["ops_share"]) > top:
            out += [f"The {top} largest of {len(p['ops_share'])} ops:", ""]
        if p.get("ops_us_per_step"):
            out += [*table(["op", "µs / step", "share %"], rows), ""]
        else:
            out += [*table(["op", "share %"], [[r[0], r[2]] for r in rows]), ""]
    if p.get("functions_us_per_step"):
        rows = [[f"`{f}`", num(us, ".1f")] for f, us in p["functions_us_per_step"].items()]
        out += ["Python-level profile (`functions_us_per_step`):", "", *table(["function", "µs / step"], rows), ""]
    return out


EMULATED_COLS = [
    ("emulated_load_s", "load s", ".2f"),
    ("emulated_ttft_ms", "TTFT ms", ".0f"),
    ("emulated_prefill_tok_s", "prefill tok/s", ".1f"),
    ("emulated_decode_tok_s", "decode tok/s", ".2f"),
    ("emulated_step_p50_ms", "step p50 ms", ".1f"),
    ("loadavg_1m", "load 1m", ".2f"),
    ("parity_max_abs", "logits max \\|Δ\\| vs host", ".2g"),
    ("parity_top1_same", "top-1 same", ".4g"),
    ("parity_gate", "gate", "g"),
    ("parity_ok", "gate ok", ".4g"),
]


def emulated_runs(runs: list[dict]) -> list[str]:
    header = ["threads", "prompt", *(h for _, h, _ in EMULATED_COLS)]
    rows = [[r.get("threads"), r.get("prompt_len"), *cells(r, EMULATED_COLS)] for r in runs]
    return [
        "## Runs (emulated)",
        "",
        "Wall times are QEMU's, not a phone's. Parity: the emulated run's exact tokens fed to the host runtime, logits "
        "compared (`parity_*`; the gate applies to fp32 only, a dash where none applies).",
        "",
        *table(header, rows),
        "",
    ]


def emulator_lines(e: dict | None, ins: dict | None) -> list[str]:
    out = []
    if e:
        out += ["## Emulator", "", *kv_table([(k, v) for k, v in e.items()]), ""]
    for arch, i in (ins or {}).items():
        if "skipped" in i:
            out += [f"## Executed {arch} instructions", "", f"Not counted: {i['skipped']}", ""]
            continue
        per = next((v for k, v in i.items() if k.endswith("_per_decoded_token")), None)
        pre = next((v for k, v in i.items() if k.endswith("_per_prefill_token")), None)
        pairs = [
            ("instructions per decoded token", num(per, ",.0f")),
            ("instructions per prefill token", num(pre, ",.0f")),
            ("tool", i.get("tool", DASH)),
            ("context, threads", f"{num(i.get('context'))}, {num(i.get('threads'))}"),
        ]
        if "runs" in i:  # one prefill + decode steps per run: (1, 1), (P, 1), (P, 1 + g)
            pairs += [
                (f"run: prompt {r['prompt']}, {r['decode_steps']} decode steps", f"{r['instructions']:,}")
                for r in i["runs"]
            ]
            why = (
                "Three runs, each one prefill then decode steps in a fresh process: (1, 1), (P, 1), (P, 1 + g). "
                "Start-up, load and one-time setup cancel in the differences: per prefill token (B - A) / (P - 1), "
                "per decoded token (C - B) / g."
            )
        else:
            pairs += [
                ("decode steps of the two runs (`decode_steps`)", " and ".join(map(str, i.get("decode_steps", [])))),
                (
                    "instructions of the two runs (`runs_total`)",
                    " and ".join(f"{x:,}" for x in i.get("runs_total", [])),
                ),
            ]
            why = (
                "The difference of two runs that differ only in decode steps, divided by that difference: start-up, "
                "load and prefill cancel."
            )
        out += [f"## Executed {arch} instructions", "", why, "", *kv_table(pairs), ""]
    return out


def render_bench(name: str, d: dict) -> str:
    a = d.get("artifact", {})
    lines = banner(name, f"bench: {a.get('target')} ({a.get('scheme')}, {a.get('layout')}), where = {d.get('where')}")
    if d.get("label"):
        lines += [f"**{d['label']}**", ""]
    lines += machine_lines(d.get("machine")) + artifact_lines(a) + config_lines(d.get("config"))
    runs = d.get("runs", [])
    if any(k.startswith("emulated_") for r in runs for k in r):
        lines += emulated_runs(runs) + emulator_lines(d.get("emulator"), d.get("instructions"))
    else:
        lines += host_runs(runs)
        lines += bandwidth_lines(d.get("bandwidth")) + roofline_lines(d.get("roofline"))
        lines += profile_lines(d.get("decode_profile"))
        lines += emulator_lines(None, d.get("instructions"))
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- peers (benchmarks/peers.py)


def is_peers(data) -> bool:
    return isinstance(data, dict) and {"bench", "exports", "ratios"} <= set(data)


PEER_COLS = [
    ("decode_tok_s", "decode tok/s", ".1f"),
    ("decode_tok_s_p50", "1 / median step", ".1f"),
    ("prefill_tok_s", "prefill tok/s", ".0f"),
    ("ttft_ms", "TTFT ms", ".0f"),
    ("step_p50_ms", "step p50 ms", ".2f"),
    ("step_p90_ms", "step p90 ms", ".2f"),
    ("load_s", "load s", ".2f"),
    ("peak_rss_mb", "peak RSS MiB", ".0f"),
    ("loadavg_1m", "load 1m", ".2f"),
    ("tokens_same_every_run", "same tokens every run", ".4g"),
]


def render_peers(name: str, d: dict) -> str:
    lines = banner(name, "pit-export beside its peers")
    lines += [
        f"Model: {d.get('model')}. Context {num(d.get('context'))}, {num(d.get('gen'))} greedy decode steps, medians "
        f"of {num(d.get('repeats'))} measured runs per process"
        + (
            f", median of {d['rounds']} processes per configuration taken in turn across artifacts"
            if d.get("rounds")
            else ""
        )
        + ". Written by `make peers` (`benchmarks/peers.py`).",
        "",
    ]
    lines += machine_lines(d.get("machine"))
    v = d.get("versions", {})
    if v.get("ours"):
        lines += ["## Versions", "", "Ours:", "", *kv_table(sorted(v["ours"].items()), ("package", "version")), ""]
    for peer, pins in sorted((v.get("peers_pinned") or {}).items()):
        lines += [f"{peer} venv (pinned): " + ", ".join(f"`{p}`" for p in pins), ""]
    if v.get("peers_installed"):
        lines += ["The full package list of each peer's venv is in the JSON (`versions.peers_installed`).", ""]

    ex = d.get("exports", {})
    rows = [
        [k, num(e.get("seconds"), ".1f"), num(e.get("peak_rss_mb"), ".0f"), num(e.get("rc"))] for k, e in ex.items()
    ]
    lines += [
        "## Exports",
        "",
        "Each stage one process: wall seconds and peak RSS (`wait4`). Ours goes from the HF folder in two processes "
        "(`ours import-hf`, then the export).",
        "",
        *table(["stage", "wall s", "peak RSS MiB", "exit"], rows),
        "",
    ]

    bench = d.get("bench", {})
    desc = [
        [k, b.get("label", ""), b.get("how", ""), mb(b.get("deployed_bytes"), ".1f")]
        for k, b in bench.items()
        if "deployed_bytes" in b
    ]
    lines += [
        "## Timed artifacts",
        "",
        "how: `bench` = `pit-export bench`; `runner` = `benchmarks/peer_runner.py` in the peer's venv (the same timing "
        "loop), or `pit-export bench`'s worker for ours (kind `worker`), each configuration of every runner artifact "
        "in turn. MB = deployed model files (`deployed_bytes`) / 10^6.",
        "",
        *table(["artifact", "what", "how", "MB"], desc),
        "",
    ]
    header = ["artifact", "threads", "prompt", *(h for _, h, _ in PEER_COLS)]
    rows = []
    for k, b in bench.items():
        if "runs" not in b:
            rows.append([k, DASH, DASH, f"not measured: {b.get('error', '')}", *[""] * (len(PEER_COLS) - 1)])
            continue
        for r in b["runs"]:
            head = [k, r.get("threads"), r.get("prompt_len")]
            if "error" in r:
                rows.append([*head, f"error: {r['error']}", *[""] * (len(PEER_COLS) - 1)])
            else:
                rows.append([*head, *cells(r, PEER_COLS)])
    lines += ["## Runs", "", *table(header, rows), ""]
    carried = [k for k, b in bench.items() if b.get("carried_over_from")]
    carried += [f"export {k}" for k, e in ex.items() if e.get("carried_over_from")]
    if carried:
        lines += [
            "Carried over from an earlier run, not measured in this one (`carried_over_from` in the JSON): "
            + ", ".join(carried)
            + ".",
            "",
        ]

    rows = []
    for r in d.get("ratios", []):
        if "error" in r:
            rows.append([r.get("pair"), "", "", f"{r['error']}", *[""] * 9])
            continue
        for i, c in enumerate(r.get("per_config") or [{}]):
            first = i == 0
            rows.append(
                [
                    r.get("pair") if first else "",
                    c.get("threads", ""),
                    c.get("prompt_len", ""),
                    num(c.get("decode_tok_s"), ".3f"),
                    num(c.get("decode_tok_s_p50"), ".3f"),
                    num(c.get("prefill_tok_s"), ".3f"),
                    num(c.get("ttft_ms"), ".3f"),
                    num(c.get("peak_rss_mb"), ".3f"),
                    num(r.get("size"), ".3f") if first else "",
                    num(r.get("nodes"), ".3f") if first else "",
                    num(r.get("export_seconds"), ".3f") if first else "",
                    num(r.get("export_peak_rss"), ".3f") if first else "",
                ]
            )
    pairs = "; ".join(f"{r.get('pair')}: {r.get('ours')} ÷ {r.get('peer')}" for r in d.get("ratios", []))
    lines += [
        "## Ours ÷ peer",
        "",
        "Above 1: ours is faster (decode, prefill), slower to its first token (TTFT), hungrier at run time (peak "
        "RSS), larger (size), has more graph nodes (nodes, ONNX) or is slower / hungrier to export (export s = ours' "
        "import-hf + export seconds ÷ the peer's; export RSS = the larger of ours' two peaks ÷ the peer's). "
        f"Pairs (`ratios`): {pairs}.",
        "",
        *table(
            [
                "pair",
                "threads",
                "prompt",
                "decode",
                "decode (1 / median step)",
                "prefill",
                "TTFT",
                "peak RSS",
                "size",
                "nodes",
                "export s",
                "export RSS",
            ],
            rows,
        ),
        "",
    ]

    def interval(q):
        return "–".join(f"{v:.3f}" for v in q["ci95"])

    steps = [
        [
            r.get("pair"),
            c["threads"],
            c["prompt_len"],
            num(q["median"], ".3f"),
            interval(q),
            f"{q['runs']} × {q['steps'] // q['runs']}",
            *((num(aa["median"], ".3f"), interval(aa)) if (aa := c.get("decode_step_ratio_control")) else (DASH, DASH)),
        ]
        for r in d.get("ratios", [])
        for c in r.get("per_config") or []
        if (q := c.get("decode_step_ratio")) and "runs" in q
    ]
    if steps:
        lines += [
            "### Decode, step by step",
            "",
            "Both folders in one process, decode step i of one next to step i of the other: each pair of neighbouring "
            "steps gives one ratio (the peer's step time ÷ ours: above 1, ours is faster). Median over every step of "
            "every run, with its 95 % interval from a bootstrap over whole runs (`per_config[].decode_step_ratio`). "
            "The A/A control times ours beside a second session of ours the same way "
            "(`decode_step_ratio_control`): how far from 1 the method reads when nothing differs.",
            "",
            *table(
                [
                    "pair",
                    "threads",
                    "prompt",
                    "median step ratio",
                    "95 % interval",
                    "runs × steps",
                    "A/A control",
                    "A/A interval",
                ],
                steps,
            ),
            "",
        ]

    graphs = [
        [
            k,
            num(g.get("nodes")),
            ", ".join(f"{op} {n}" for op, n in g.get("top_ops", {}).items()),
            ", ".join(f"level {lvl}: {n}" for lvl, n in (g.get("matmulnbits_accuracy_level") or {}).items()) or DASH,
        ]
        for k, b in bench.items()
        if (g := b.get("graph"))
    ]
    if graphs:
        lines += [
            "## ONNX graphs",
            "",
            *table(["artifact", "nodes", "most frequent ops", "MatMulNBits accuracy_level"], graphs),
            "",
        ]
    for k, b in bench.items():
        lines += profile_lines(b.get("decode_profile"), top=10, heading=f"### Decode profile: {k}")
    if d.get("venv_errors"):
        lines += ["## Venv errors", "", *kv_table(sorted(d["venv_errors"].items())), ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- scale run (benchmarks/scale.py)


def is_scale(data) -> bool:
    return isinstance(data, dict) and "stages" in data and "rss_budget_mb" in data


PARITY_ROWS = [
    ("max_abs_logit", ".2g"),
    ("cosine_min", ".12f"),
    ("kl_mean", ".2g"),
    ("top1", ".4f"),
    ("ppl_ratio", ".8f"),
    ("greedy_agree", ".3f"),
    ("greedy_tokens", "d"),
    ("interface_err_max", ".2g"),
    ("round_trip_max_abs", ".2g"),
    ("round_trip_argmax", ".4f"),
    ("positions", "d"),
]


def render_scale(name: str, d: dict) -> str:
    ck = d.get("fp32_checkpoint_mb")
    model = str(d.get("model") or "").split(",")[0]
    lines = banner(name, f"Scale run: {model} through import → export → validate")
    script = (
        "benchmarks/scale_qwen.py" if "deployed_bytes" in d else "benchmarks/scale.py (also run by `make test-slow`)"
    )
    lines += [
        f"Model: {d.get('model')}; {model_line(d.get('config'))}. Imported with `max_seq_len` "
        f"{num(d.get('max_seq_len'))}. Written by `{script}`.",
        "",
    ]
    sizes = d.get("deployed_bytes") or {}
    if sizes:
        rows = [[k, mb(v, ".1f")] for k, v in sizes.items()]
        lines += [
            "## Deployed sizes (`deployed_bytes`: graph + weights a runtime loads)",
            "",
            *table(["artifact", "MB"], rows),
        ]
        lines += ["", f"PIT compact ÷ builder's tied export: {num(d.get('pit_compact_over_builder'), '.4f')}", ""]
    pairs = [
        ("fp32 checkpoint MiB (`fp32_checkpoint_mb`)", num(ck, ".1f")),
        ("memory budget MiB (`rss_budget_mb`)", num(d.get("rss_budget_mb"), ".1f")),
        ("stages run in parallel (`jobs`)", num(d.get("jobs"))),
        ("setup seconds (HF model + tokenizer; 0 = cached)", num(d.get("setup_seconds"), ".1f")),
        ("host CPUs (`host.cpus`)", num((d.get("host") or {}).get("cpus"))),
    ]
    lines += ["## Setup", "", *kv_table(pairs), ""]
    within = d.get("within_budget", {})
    rows = []
    for s in d.get("stages", []):
        pss = s.get("peak_tree_pss_mb")
        rows.append(
            [
                s.get("stage"),
                num(s.get("seconds"), ".1f"),
                num(s.get("peak_mb"), ".1f"),
                num(s.get("peak_rss_mb"), ".1f"),
                num(pss, ".1f") if pss else DASH,
                num(s["peak_mb"] / ck, ".2f") if ck and s.get("peak_mb") is not None else DASH,
                num(within.get(s.get("stage"))),
                num(s.get("rc")),
            ]
        )
    lines += [
        "## Stages",
        "",
        "Every stage is the CLI in its own process. peak = the larger of `wait4`'s ru_maxrss (the largest RSS of the "
        "process or of a child it forked) and the summed PSS of its process tree, sampled while it has children (a "
        "dash: it had none). MiB.",
        "",
        *table(
            [
                "stage",
                "wall s",
                "peak",
                "ru_maxrss",
                "tree PSS",
                "peak ÷ checkpoint",
                "within budget",
                "exit",
            ],
            rows,
        ),
        "",
    ]
    notes = [(s["stage"], s[k]) for s in d.get("stages", []) for k in ("measured", "note") if s.get(k)]
    if notes:
        lines += [*(f"- {stage}: {text}" for stage, text in notes), ""]
    imp = d.get("import") or {}
    if imp:
        pairs = [(k, value(v)) for k, v in imp.items() if k not in ("out", "source")]
        lines += ["## Import (`import`)", "", *kv_table(pairs, ("field", "value")), ""]
    fold = next((s.get("result") for s in d.get("stages", []) if s.get("stage", "").startswith("fold")), None)
    if fold:
        pairs = [(k, value(v)) for k, v in fold.items() if k != "out"]
        lines += ["## Fold (the `fold` stage's result)", "", *kv_table(pairs, ("field", "value")), ""]
    arts = []
    for s in d.get("stages", []):
        for a in ((s.get("result") or {}).get("artifacts") or []) if s.get("stage", "").startswith("export") else []:
            arts.append(
                [
                    a.get("target"),
                    a.get("scheme"),
                    a.get("layout"),
                    mb(a.get("bytes"), ".1f"),
                    ", ".join(a["deploy_files"]),
                ]
            )
    if arts:
        lines += [
            "## Exported artifacts",
            "",
            "MB = deployed files (`bytes`) / 10^6.",
            "",
            *table(["target", "scheme", "layout", "MB", "deployed files"], arts),
            "",
        ]
    parity = d.get("parity") or {}
    if parity:
        targets = list(parity)
        rows = [[k, *(num(parity[t].get(k), spec) for t in targets)] for k, spec in PARITY_ROWS]
        rows.append(["passed", *(num(parity[t].get("passed")) for t in targets)])
        gates = []
        for s in d.get("stages", []):
            for r in (s.get("result") or {}).get("results") or []:
                if r.get("gates"):
                    gates = [f"{g['metric']} {g['op']} {g['threshold']:g}" for g in r["gates"]]
                    break
        lines += [
            "## Parity against the training graph (`parity`)",
            "",
            ("Gates: " + "; ".join(gates) + ".") if gates else "",
            "",
            *table(["metric", *targets], rows),
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- anything else


def flatten(x, prefix: str = ""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, x


def render_generic(name: str, data) -> str:
    lines = banner(name, name) + table(["field", "value"], [[k, num(v, "g")] for k, v in flatten(data)])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- entry points


# ---------------------------------------------------------------- rounding variants (benchmarks/quant_variants.py)


def is_quant_variants(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("rows"), list) and all("rounding" in r for r in data["rows"])


QUANT_COLS = [
    ("ppl_ratio", "ppl ratio", ".4f"),
    ("kl_mean", "KL mean", ".4f"),
    ("kl_p99", "KL p99", ".4f"),
    ("top1", "top-1", ".4f"),
    ("interface_err_max", "W·E − I max", ".3g"),
    ("interface_err_fro", "W·E − I Frobenius", ".3g"),
    ("round_trip_max_abs", "round trip max", ".3g"),
    ("round_trip_argmax", "round trip argmax", ".4f"),
    ("export_wall_s", "export s", ".1f"),
    ("calibration_s", "of which calibration s", ".1f"),
    ("load_avg", "load", ".1f"),
]


def render_quant_variants(name: str, d: dict) -> str:
    lines = banner(name, "Rounding variants of the 4-bit presets, PIT and tied")
    lines += [
        "Written by `benchmarks/quant_variants.py`: each row is an artifact exported through the target's real backend "
        "and validated through its runtime against the training graph on the held-out windows of its `windows` "
        "column (256 tokens each). rounding: `rtn` = the backend's round to nearest; `gptq` = "
        "the V × d tables GPTQ-rounded on the backend's grid; `gptq-all` = every 4-bit weight. Calibration reads "
        "training-split text only. MB = `model_bytes` / 10^6; off grid = weights whose backend codes differ from "
        "GPTQ's (`off_grid`); load = the host's 1-minute load average after the row (`load_avg`), shared 2-core host.",
        "",
    ]
    header = ["target", "model", "layout", "scheme", "rounding", "windows", "MB", "passed", "off grid"]
    header += [h for _, h, _ in QUANT_COLS]
    body = []
    for r in d["rows"]:
        row = [r.get("target"), r.get("model"), r.get("layout"), r.get("scheme"), r.get("rounding")]
        row += [num(r.get("windows", d.get("windows")))]
        row += [mb(r.get("model_bytes"), ".3f"), "yes" if r.get("passed") else "**no**", num(r.get("off_grid"))]
        body.append(row + cells(r, QUANT_COLS))
    return "\n".join(lines + table(header, body)) + "\n"


# ---------------------------------------------------------------- ARM64 instruction counts beside the peers
# (benchmarks/emu/count_peers.py)


def is_peers_arm64(d) -> bool:
    return isinstance(d, dict) and "artifacts" in d and "ratios" in d and "decode_steps" in d


def render_peers_arm64(name: str, d: dict) -> str:
    lines = banner(name, "Executed ARM64 instructions per token: ours beside the peers")
    lines += [
        f"{d['what']}; prompt of {d['prompt_len']} fixed ids (`prompt_len`), {d['decode_steps']} decode steps after "
        "the first (`decode_steps`). Per prefill token = (count(P, 1) − count(1, 1)) / (P − 1); per decoded token = "
        "(count(P, 1 + g) − count(P, 1)) / g: start-up, load and one-time setup cancel. Counts do not depend on "
        "emulation speed or the host's load. Written by `benchmarks/emu/count_peers.py`.",
        "",
    ]
    rows = []
    for label, r in d["artifacts"].items():
        if "missing" in r:
            rows.append([label, DASH, DASH, f"{r['what']} — {r['missing']}"])
        else:
            pre, dec = r["arm64_instructions_per_prefill_token"], r["arm64_instructions_per_decoded_token"]
            rows.append([label, num(pre / 1e6, ".3f"), num(dec / 1e6, ".3f"), r["what"]])
    lines += table(["artifact", "M instructions / prefill token", "M instructions / decoded token", "what"], rows)
    ratios = [
        [k, num(q["prefill_ours_over_peer"], ".3f"), num(q["decoded_ours_over_peer"], ".3f")]
        for k, q in d["ratios"].items()
    ]
    if ratios:
        lines += ["", *table(["runtime", "ours / peer, prefill", "ours / peer, decode"], ratios)]
    return "\n".join(lines).rstrip() + "\n"


def render(name: str, data) -> str:
    """The markdown for one parsed results JSON named `name` (the file's stem)."""
    if is_peers_arm64(data):
        return render_peers_arm64(name, data)
    if is_quant_variants(data):
        return render_quant_variants(name, data)
    if is_artifact_table(data):
        return render_artifacts(name, data)
    if is_bench(data):
        return render_bench(name, data)
    if is_peers(data):
        return render_peers(name, data)
    if is_scale(data):
        return render_scale(name, data)
    return render_generic(name, data)


def render_file(path: Path, write: bool = True) -> tuple[Path, str]:
    """Render `path` (a .json) to the .md beside it; returns (md path, text). `write=False` only renders."""
    path = Path(path)
    text = render(path.stem, json.loads(path.read_text()))
    md = path.with_suffix(".md")
    if write:
        md.write_text(text)
    return md, text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, help=f"JSON files (default: {RESULTS}/*.json)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a .md is missing or stale")
    a = ap.parse_args(argv)
    files = a.files or sorted(RESULTS.glob("*.json"))
    stale = []
    for f in files:
        md, text = render_file(f, write=not a.check)
        if a.check:
            if not md.is_file() or md.read_text() != text:
                stale.append(md)
        else:
            print(md)
    for md in stale:
        print(f"stale: {md} (rerun benchmarks/render.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

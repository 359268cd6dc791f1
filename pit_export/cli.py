"""pit-export command line. Exit codes: 0 ok, 1 internal error, 2 bad input, 3 gate failed, 4 unavailable here,
5 output location unusable (exists without --force, not writable, disk full), 130/143 interrupted (SIGINT/SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from pit_export.errors import BadInput, GateFailed, PitError, exit_code, interrupted
from pit_export.models.checkpoint import remove_pending
from pit_export.quiet import quiet_toolchains

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fold, quantize, export and validate Pseudo-Inverse-Tied (PIT) language models for phones.",
)
# piped into logs or CI, rich would assume 80 columns and squeeze the tables; a terminal keeps its own width
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 200)
STATE = {"debug": False}
LIVE: list[Progress] = []  # the progress display on screen, if any

CkptArg = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint folder (config.json, model.safetensors, tokenizer.json), or a shipped model's name."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
ThreadsOpt = Annotated[int, typer.Option(help="CPU threads for the runtimes.")]
EvalTextOpt = Annotated[
    Path | None,
    typer.Option(
        help="Plain-text file (UTF-8) scored instead of the shipped held-out split, tokenized with the model's "
        "tokenizer; the report names it and its sha256."
    ),
]


def _eval_text(c, text: Path | None, n_windows: int) -> str | None:
    """--eval-text checked before any work: readable, long enough for the windows asked for (exit 2 if not)."""
    if text is None:
        return None
    from pit_export.validate import heldout

    heldout(c, str(text), n_windows)
    return str(text)


ForceOpt = Annotated[
    bool, typer.Option("--force", help="Replace an existing output folder that pit-export wrote (never other files).")
]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False):
    STATE["debug"] = debug
    if debug:
        os.environ["PIT_EXPORT_DEBUG"] = "1"  # runtimes keep their native logs


@contextmanager
def progress(enabled: bool = True):
    """A rich progress display on stderr (so --json stdout stays clean)."""
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not enabled,
    ) as p:
        LIVE.append(p)
        try:
            yield p
        finally:
            LIVE.remove(p)


def _check_out(path: Path, force: bool, *inputs: Path | None):
    """Before any work: an unusable output is said now, not after minutes of exporting (atomic_dir checks again).
    The output may not be, contain or lie inside an input; --force replaces only a folder pit-export wrote."""
    from pit_export.models.checkpoint import check_output, resolve_model

    check_output(path, force, [resolve_model(i) for i in inputs if i is not None])


def _load(path: Path, runtime: bool = True):
    """A checkpoint; `runtime`: it will be exported or run, so its context must fit this machine's memory."""
    from pit_export.models.checkpoint import load_checkpoint

    return load_checkpoint(path, runtime)


def _emit(data: dict, as_json: bool, table: Table | None = None):
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=float) + "\n")
    elif table is not None:
        out.print(table)


def _kv_table(title: str, rows: dict) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows.items():
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    return t


@app.command()
def inspect(ckpt: CkptArg, json_out: JsonOpt = False):
    """Shapes, parameter counts, cond(T), orthonormality of Z and the tying inconsistency of a checkpoint."""
    import torch

    from pit_export.fold import reference_interface
    from pit_export.interface import model_diagnostics
    from pit_export.models.checkpoint import CACHE_COPIES
    from pit_export.models.pit import cache_bytes

    c = _load(ckpt, runtime=False)  # inspecting needs no caches: a context this machine cannot run is still shown
    cfg = c.config
    sd = c.model.state_for_checkpoint()
    info = {
        "path": str(ckpt),
        "config": asdict(cfg),
        "params": sum(v.numel() for v in sd.values()),
        "context_bytes": CACHE_COPIES * cache_bytes(cfg),  # what export/validate need for KV caches + RoPE tables
        "tensors": {k: list(v.shape) for k, v in sd.items()},
    }
    if cfg.tying == "pit":
        L = sd["pit.l"].double()
        ev = torch.linalg.eigvalsh(L @ L.T)
        info |= {
            "cond_T": (ev.max() / ev.min()).item(),
            "T_eig_min": ev.min().item(),
            "T_eig_max": ev.max().item(),
            "L_diag_min": torch.diagonal(L).min().item(),
            "ortho_err_max": c.ortho_error,
        }
    wE = reference_interface(c.model) - torch.eye(cfg.dim, dtype=torch.float64)
    info["delta_TI_max"] = wE.abs().max().item()  # |W_out E - I|: ~0 for PIT, large for tied/untied
    info["delta_TI_fro"] = torch.linalg.norm(wE).item()
    info["interface"] = model_diagnostics(c.model)  # input vs output table: cosines, kNN overlap, delta_TI_selfsim
    rows = {
        "tying": cfg.tying,
        "vocab x dim": f"{cfg.vocab_size} x {cfg.dim}",
        "layers / heads / kv heads": f"{cfg.n_layers} / {cfg.n_heads} / {cfg.n_kv_heads}",
        "max_seq_len": cfg.max_seq_len,
        "context memory (export/run)": f"{info['context_bytes'] / 2**20:,.0f} MiB",
        "parameters": f"{info['params']:,}",
    }
    for k in ("cond_T", "T_eig_min", "T_eig_max", "L_diag_min", "ortho_err_max", "delta_TI_max", "delta_TI_fro"):
        if k in info:
            rows[k] = info[k]
    for k, v in info["interface"].items():
        rows[k] = f"{v['mean']:.4g} (p05 {v['p05']:.4g})" if isinstance(v, dict) else v
    _emit(info, json_out, _kv_table(f"checkpoint {ckpt}", rows))


@app.command("fold")
def fold_cmd(
    ckpt: CkptArg,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the folded model.")],
    layout: Annotated[str, typer.Option(help="untied | shared-z | shared-e")] = "shared-z",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
):
    """Fold the Cholesky transform into static matrices (float64 solves) and write a folded PyTorch model."""
    from pit_export.fold import fold, save_folded

    _check_out(out_dir, force, ckpt)
    c = _load(ckpt)
    fw, rep = fold(c, layout)
    save_folded(out_dir, fw, rep, c, force)
    for w in rep.warnings:
        err.print(f"[yellow]warning:[/yellow] {w}")
    _emit({"out": str(out_dir), **asdict(rep)}, json_out, _kv_table(f"folded {ckpt} -> {out_dir}", asdict(rep)))


def _result_table(res) -> Table:
    t = Table(title=f"{res.session} vs training graph [{res.scheme}]", title_justify="left")
    for col in ("metric", "value", "gate", "ok"):
        t.add_column(col)
    gates = {g.metric: g for g in res.gates}
    for k, v in res.metrics.items():
        g = gates.get(k)
        ok = "" if g is None else ("[green]pass" if g.passed else "[red]FAIL")
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v), f"{g.op} {g.threshold:g}" if g else "", ok)
    return t


@app.command()
def validate(
    ckpt: CkptArg,
    artifact: Annotated[
        list[Path] | None, typer.Option(help="Artifact folder(s) to check; default: fold in memory.")
    ] = None,
    layout: Annotated[
        str,
        typer.Option(
            help="Layout(s) to fold when no artifact is given: names, comma-separated; 'shipped' (the layouts the "
            "targets export) or 'all' (shared-e too, whose fp32 error grows as cond(T)^2: the fold warns)."
        ),
    ] = "shipped",
    scheme: Annotated[
        str | None, typer.Option(help="Gate set (fp32, fp16, int8, 8da4w, int4, palettize4); default: the artifact's.")
    ] = None,
    n_windows: Annotated[
        int | None, typer.Option(help="Held-out windows for logits and perplexity (default 8; 2 on arm64-emu).")
    ] = None,
    n_greedy: Annotated[int, typer.Option(help="Greedy tokens compared.")] = 64,
    gates: Annotated[Path | None, typer.Option(help="JSON gate overrides (see export --help).")] = None,
    eval_text: EvalTextOpt = None,
    threads: ThreadsOpt = 2,
    where: Annotated[
        str,
        typer.Option(
            help="host | arm64-emu: run each artifact's runtime on emulated ARM64 (QEMU, `make emu`), the same "
            "metrics and gates."
        ),
    ] = "host",
    json_out: JsonOpt = False,
):
    """Compare artifacts (or in-memory folds) with the training graph; exit 3 if a gate fails."""
    from pit_export.fold import fold, layouts_for
    from pit_export.models.checkpoint import artifact_config
    from pit_export.pipeline import baseline_layout as pipeline_layout
    from pit_export.runtimes import open_session
    from pit_export.runtimes.pytorch import FoldedSession
    from pit_export.validate import load_gates

    table = load_gates(gates) if gates else None
    # --- where: the artifacts' runtimes on this host, or inside the emulated ARM64 root (pit_export/emu.py)
    if where not in ("host", "arm64-emu"):
        raise BadInput(f"--where must be host or arm64-emu, got {where!r}")
    if where == "arm64-emu":
        from pit_export import emu

        if not artifact:
            raise BadInput("--where arm64-emu validates artifact folders: give --artifact")
        for a in artifact:  # missing QEMU, root or runtime layer: exit 4 before the reference is recorded
            emu.root(emu.backend_of(a))
        open_session = emu.open_session  # noqa: F811
    n_windows = n_windows or (2 if where == "arm64-emu" else 8)
    # ---
    for a in artifact or ():  # before the reference is recorded: a bad artifact config fails in milliseconds
        artifact_config(a)
    c = _load(ckpt)
    text = _eval_text(c, eval_text, n_windows)
    if artifact:
        targets = [(str(a), lambda a=a: open_session(a, threads=threads)) for a in artifact]
    else:
        if layout in ("all", "shipped"):
            from pit_export.export import TARGETS

            shipped = {pipeline_layout(t.layout, c.config.tying) for t in TARGETS.values()}
            names = tuple(n for n in layouts_for(c.config.tying) if layout == "all" or n in shipped)
        else:
            names = tuple(layout.split(","))
        targets = [(f"fold {n}", lambda n=n: FoldedSession(fold(c, n)[0], threads)) for n in names]
    from pit_export.validate import ValidateConfig

    cfg = ValidateConfig(n_windows=n_windows, n_greedy=n_greedy, eval_text=text)
    results = _validate_sessions(c, targets, scheme, cfg, threads, json_out, table, bool(artifact))
    _emit(
        {"checkpoint": str(ckpt), "results": [r.to_dict() for r in results], "passed": all(r.passed for r in results)},
        json_out,
    )
    e = _gate_error(results)
    if e:
        raise e


def _validate_sessions(ckpt, openers, scheme, cfg, threads, json_out, gate_table=None, release=False):
    """Validate each (label, opener) against the training graph through the one orchestrator (validate.Validator);
    prints tables, returns results. With `release` the checkpoint's model is dropped once the reference is recorded
    (its logits and embed/unembed tables wait in temporary files), so the reference and an artifact are never in
    memory together."""
    from pit_export.memory import release_memory
    from pit_export.validate import Validator

    results = []
    with progress(not json_out) as p, Validator(ckpt, cfg, threads, gate_table) as v:
        task = p.add_task("reference", total=None)
        v.record()
        p.remove_task(task)
        if release:
            ckpt.model = None
            release_memory()
        for label, opener in openers:
            task = p.add_task(label, total=None)
            sess = opener()
            try:
                res = v.check(
                    sess,
                    scheme,
                    label if release else None,
                    lambda m, task=task, label=label: p.update(task, description=f"{label}: {m}"),
                )
            finally:
                sess.close()
            p.remove_task(task)
            results.append(res)
            if not json_out:
                out.print(_result_table(res))
    return results


def _gate_error(results) -> GateFailed | None:
    failed = [
        f"{r.artifact or r.session}: {g.metric}={'missing' if g.value is None else f'{g.value:.4g}'} "
        f"(gate {g.op} {g.threshold:g})"
        for r in results
        for g in r.failures()
    ]
    return GateFailed("gate failed: " + "; ".join(failed)) if failed else None


@app.command("export")
def export_cmd(
    ckpt: CkptArg,
    target: Annotated[str, typer.Option(help="android | onnx-cpu | ios | all (or a comma-separated list).")],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder: one artifact folder per target + report.")
    ],
    scheme: Annotated[
        str | None, typer.Option(help="fp32 | int8 | 8da4w | int4; ios also fp16 | palettize4 (default: the preset).")
    ] = None,
    layout: Annotated[str | None, typer.Option(help="untied | shared-z | shared-e (default: the target's).")] = None,
    embedding_bits: Annotated[
        int | None, typer.Option(help="Embedding table bits: 4, 8, or 0 for float (default: the preset's).")
    ] = None,
    rounding: Annotated[
        str | None,
        typer.Option(help="4-bit rounding: rtn | gptq (tables) | gptq-all (default: the preset's; rtn with --scheme)."),
    ] = None,
    gates: Annotated[
        Path | None, typer.Option(help='JSON gate overrides, e.g. {"int4": {"ppl_ratio": ["<=", 1.02]}}.')
    ] = None,
    baseline: Annotated[
        Path | None, typer.Option(help="Tied checkpoint exported with the same presets, for size comparison.")
    ] = None,
    keep_failed: Annotated[bool, typer.Option(help="Keep artifacts that fail their gates (marked failed).")] = False,
    check: Annotated[
        bool, typer.Option("--validate/--no-validate", help="Validate through each runtime (gates) before writing.")
    ] = True,
    force: ForceOpt = False,
    n_windows: Annotated[int, typer.Option(help="Held-out windows for validation.")] = 8,
    n_greedy: Annotated[int, typer.Option(help="Greedy tokens compared.")] = 64,
    eval_text: EvalTextOpt = None,
    threads: ThreadsOpt = 2,
    json_out: JsonOpt = False,
):
    """Fold -> quantize -> export -> validate (through each real runtime) -> report; exit 3 if a gate fails."""
    from pit_export import pipeline
    from pit_export.report import COMPACT, summary_header, summary_rows
    from pit_export.validate import load_gates

    targets = pipeline.parse_targets(target)
    opts = pipeline.PipelineOptions(
        scheme=scheme,
        layout=layout,
        embedding_bits=embedding_bits,
        rounding=rounding,
        gates=load_gates(gates) if gates else None,
        n_windows=n_windows,
        n_greedy=n_greedy,
        threads=threads,
        keep_failed=keep_failed,
        force=force,
        validate=check,
    )
    pipeline.check_options(opts)
    _check_out(out_dir, force, ckpt, baseline, gates, eval_text)
    c = _load(ckpt)
    opts.eval_text = _eval_text(c, eval_text, n_windows) if check else None
    opts.baseline = _load(baseline) if baseline else None
    with progress(not json_out) as p:
        tasks = {}

        def step(name: str, msg: str):
            if name not in tasks:
                tasks[name] = p.add_task(name, total=None)
            p.update(tasks[name], description=f"{name}: {msg}")

        result = pipeline.run(c, targets, out_dir, opts, step, target == pipeline.ALL, release_source=True)
    if json_out:
        _emit(json.loads((out_dir / "report.json").read_text()), True)
    else:
        t = Table(title=f"pit-export {ckpt} -> {out_dir}", title_justify="left")
        for col in summary_header(COMPACT):
            t.add_column(col, no_wrap=True)
        for row in summary_rows(result.artifacts + result.baseline, COMPACT):
            t.add_row(*row)
        out.print(t)
        for a in result.artifacts:
            if a.note:
                out.print(f"[yellow]{a.target}[/yellow]: {a.note}", highlight=False)
        out.print(f"report: {out_dir / 'report.md'} (CI: {out_dir / 'report.json'})")
    e = pipeline.gate_error(result)
    if e:
        raise e


@app.command()
def generate(
    path: Annotated[Path, typer.Argument(help="Checkpoint folder (runs the training graph) or artifact folder.")],
    prompt: Annotated[str, typer.Option(help="Text prompt.")] = "def ",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy; otherwise softmax(logits / T) sampling.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: keep the most probable tokens summing to p.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed (the same seed gives every session the same draws).")] = 0,
    artifact: Annotated[
        list[Path] | None,
        typer.Option(help="With a checkpoint: also run these artifacts and show all continuations side by side."),
    ] = None,
    fold_layout: Annotated[str | None, typer.Option("--fold", help="Fold a checkpoint in memory first.")] = None,
    threads: ThreadsOpt = 2,
    json_out: JsonOpt = False,
):
    """Text generation through any session's prefill + decode (greedy, or sampled with --temperature/--top-p/--seed).

    With --artifact: the training graph's continuation beside each artifact's, on the same seed, with the first
    token where each differs: the export's fidelity, visible."""
    import time

    from tokenizers import Tokenizer

    from pit_export.generate import check_sampling, compare, render
    from pit_export.generate import generate as run_generate
    from pit_export.runtimes import open_session
    from pit_export.runtimes.base import artifact_backend

    check_sampling(temperature, top_p)
    if artifact_backend(path) is None:
        c = _load(path)
        tok, eos = c.tokenizer, c.config.eos_id
        if fold_layout:
            from pit_export.fold import fold
            from pit_export.runtimes.pytorch import FoldedSession

            sess = FoldedSession(fold(c, fold_layout)[0], threads)
        else:
            from pit_export.runtimes.pytorch import ReferenceSession

            sess = ReferenceSession(c.model, threads)
    else:
        if artifact:
            raise BadInput("--artifact compares artifacts with a checkpoint: give the checkpoint folder as PATH")
        sess = open_session(path, threads=threads)
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        eos = tok.token_to_id("<|eos|>")
    ids = tok.encode(prompt).ids
    if not ids:
        raise BadInput("prompt encodes to no tokens")
    if len(ids) >= sess.max_seq_len:
        raise BadInput(f"prompt has {len(ids)} tokens; the model's context is {sess.max_seq_len}")
    stop = {eos} if eos is not None else set()
    if artifact:
        sessions = [(f"training graph ({path})", sess)] + [(str(a), open_session(a, threads=threads)) for a in artifact]
        rows = compare(sessions, ids, max_new_tokens, stop, temperature, top_p, seed)
        for _, s in sessions:
            s.close()
        if json_out:
            _emit({"prompt": prompt, "temperature": temperature, "top_p": top_p, "seed": seed, "rows": rows}, True)
        else:
            title = f"{prompt!r} -> {max_new_tokens} tokens (temperature {temperature:g}, top-p {top_p:g}, seed {seed})"
            out.print(render(rows, tok.decode, title))
        return
    t0 = time.perf_counter()
    new = run_generate(sess, ids, max_new_tokens, stop, temperature, top_p, seed)
    dt = time.perf_counter() - t0
    text = tok.decode(new)
    if json_out:
        _emit({"session": sess.name, "prompt": prompt, "tokens": new, "text": text, "seconds": dt}, True)
    else:
        err.print(f"[dim]{sess.name}: {len(new)} tokens in {dt:.2f}s[/dim]")
        out.print(prompt + text, markup=False, highlight=False)
    sess.close()


@app.command("bench")
def bench_cmd(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder (its pit_export.json).")],
    where: Annotated[str, typer.Option(help="host | arm64-emu (QEMU, `make emu`) | adb (attached Android device).")] = (
        "host"
    ),
    threads: Annotated[str, typer.Option(help="Thread counts, comma-separated.")] = "1,2",
    prompt_len: Annotated[str, typer.Option(help="Prompt lengths, comma-separated.")] = "64,128",
    gen: Annotated[int, typer.Option(help="Decode steps after the first token.")] = 64,
    repeats: Annotated[int, typer.Option(help="Measured runs per configuration (after one warm-up).")] = 3,
    instructions: Annotated[
        bool, typer.Option(help="arm64-emu: also count executed instructions per decoded token (minutes).")
    ] = False,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="JSON file (default benchmarks/results/bench-<backend>-<where>.json).")
    ] = None,
    json_out: JsonOpt = False,
):
    """Prefill/decode speed, time to first token, peak RSS, load time, size, bytes/token and phone projections."""
    from pit_export import bench

    cfg = bench.BenchConfig(
        bench.parse_ints(threads, "--threads"), bench.parse_ints(prompt_len, "--prompt-len"), gen, repeats, instructions
    )
    if out_file is not None:
        bench.check_out_file(out_file, artifact)
    with progress(not json_out) as p:
        task = p.add_task("bench", total=None)
        data = bench.bench(artifact, where, cfg, lambda m: p.update(task, description=m))
    path = out_file or bench.default_out(data["artifact"], where)
    bench.check_out_file(path, artifact)
    bench.write_json(data, path)
    _emit(data, json_out, bench.table(data))
    if not json_out:
        out.print(f"{data['label']}; JSON: {path}", highlight=False)


@app.command()
def train(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint folder to write.")],
    tying: Annotated[str, typer.Option(help="pit | tied | untied")] = "pit",
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default 800; 100 with --from).")] = None,
    tokenizer_from: Annotated[Path | None, typer.Option(help="Reuse this checkpoint's tokenizer.")] = None,
    train_z: Annotated[bool, typer.Option(help="PIT: train Z too, re-orthonormalised after each step.")] = False,
    from_ckpt: Annotated[
        Path | None, typer.Option("--from", help="Adapt an imported PIT checkpoint to its teacher (distillation).")
    ] = None,
    teacher: Annotated[Path | None, typer.Option(help="With --from: HF teacher folder (default: import's).")] = None,
    train_body: Annotated[bool, typer.Option(help="With --from: train the body too, not only L.")] = False,
    threads: ThreadsOpt = 2,
    force: ForceOpt = False,
):
    """Train a small model (and BPE tokenizer) on the CPython stdlib corpus: how the default models were made.

    With --from: short distillation of an imported PIT model towards its teacher; KL before/after."""
    from pit_export.models.pit import TYINGS, ModelConfig
    from pit_export.models.train import TrainConfig
    from pit_export.models.train import train as run_train

    if from_ckpt is not None:
        import torch

        from pit_export.adapt import AdaptConfig, adapt, teacher_of

        _check_out(out_dir, force, from_ckpt, teacher or teacher_of(from_ckpt), tokenizer_from)
        torch.set_num_threads(threads)
        ac = AdaptConfig(steps=steps or AdaptConfig.steps, train_body=train_body)
        rep = adapt(from_ckpt, out_dir, ac, teacher, progress=lambda m: err.print(f"[dim]{m}[/dim]"), force=force)
        out.print(f"KL(teacher || PIT) {rep['before']['kl_mean']:.4f} -> {rep['after']['kl_mean']:.4f} -> {out_dir}")
        return
    steps = steps or 800
    if tying not in TYINGS:
        raise BadInput(f"--tying must be one of {TYINGS}")
    _check_out(out_dir, force, tokenizer_from)
    with progress() as p:
        task = p.add_task("training", total=steps)

        def report(msg: str):
            if msg.startswith("step ") and "loss" in msg:
                p.update(task, completed=int(msg.split()[1]) + 1, description=msg)
            else:
                p.console.print(msg)

        m = run_train(
            out_dir,
            TrainConfig(steps=steps, threads=threads, model=ModelConfig(tying=tying, train_z=train_z)),
            tokenizer_from,
            report,
            force,
        )
    out.print(f"held-out perplexity {m['heldout_ppl']:.2f} (unigram {m['unigram_ppl']:.2f}) -> {out_dir}")


@app.command("import-hf")
def import_hf_cmd(
    src: Annotated[Path, typer.Argument(help="Local HF folder (config.json, *.safetensors, tokenizer.json).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="PIT checkpoint folder to write.")],
    init: Annotated[str, typer.Option(help="T: identity | input (embeddings exact) | output (head exact).")] = "output",
    max_seq_len: Annotated[int, typer.Option(help="Context of the imported model (capped by the teacher's).")] = 512,
    n_windows: Annotated[int, typer.Option(help="Held-out windows for the teacher-vs-PIT KL.")] = 4,
    eval_text: EvalTextOpt = None,
    pit_z: Annotated[
        str | None, typer.Option(help="A PIT model in HF layout: Z's tensor name (found as pit.z when not given).")
    ] = None,
    pit_l: Annotated[str | None, typer.Option(help="L, the lower-triangular factor (found as pit.l).")] = None,
    pit_l_strict: Annotated[
        str | None, typer.Option(help="L as strict-lower part (with --pit-l-log-diag; found as pit.l_strict).")
    ] = None,
    pit_l_log_diag: Annotated[str | None, typer.Option(help="L's log-diagonal (found as pit.l_log_diag).")] = None,
    threads: ThreadsOpt = 2,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
):
    """Import a Hugging Face checkpoint (Llama-3.x, Mistral, Qwen2.5, Qwen3, Gemma 3, SmolLM3) as PIT: the polar
    decomposition of its table and the KL to it; or a PIT model in HF layout (Z and L kept, checked)."""
    import torch

    from pit_export.hf_import import import_hf

    _check_out(out_dir, force, src, eval_text)
    torch.set_num_threads(threads)
    names = {"z": pit_z, "l": pit_l, "l_strict": pit_l_strict, "l_log_diag": pit_l_log_diag}
    rep = import_hf(
        src,
        out_dir,
        init,
        max_seq_len,
        n_windows,
        progress=lambda m: err.print(f"[dim]{m}[/dim]"),
        force=force,
        eval_text=eval_text,
        pit_names=names,
    )
    _emit({"out": str(out_dir), **asdict(rep)}, json_out, _kv_table(f"imported {src} -> {out_dir}", asdict(rep)))


def main():
    """Console entry point: one-line errors and distinct exit codes instead of tracebacks.

    click (standalone) handles --help and usage errors (exit 2); our errors carry their own exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # toolchain import chatter (torchao's optional CUDA kernels, torch pytree deprecations, coremltools' missing macOS
    # runtime and its per-pass progress bars) is not the user's problem
    if "--debug" not in sys.argv:
        quiet_toolchains()
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        app()
    except Exception as e:
        if STATE["debug"]:
            raise
        code = exit_code(e)
        known = isinstance(e, PitError)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not known:  # a bug or an unanticipated toolchain failure: still one line, with the way to the traceback
            msg = f"internal error: {type(e).__name__}: {msg} (run with --debug for the traceback)"
        err.print(f"[red]error:[/red] {msg}", highlight=False)
        sys.exit(code)


def _interrupted(signum, frame):
    """Stop now: remove this process's temporary folders, say so in one line, exit 128 + signum.

    Not an exception: the handler can run inside a toolchain's Python callback called from C++ (torch.export's
    dispatch, the ONNX exporter), where an exception aborts the process (std::terminate) instead of unwinding.
    The atomic renames block these signals, so an output folder is complete or absent whenever this runs."""
    remove_pending()
    if LIVE:  # a rich progress display hides the cursor; give it back
        LIVE[-1].stop()
    err.print(f"[red]error:[/red] {interrupted(signum)}", highlight=False)
    sys.stderr.flush()
    os._exit(128 + signum)


if __name__ == "__main__":
    main()

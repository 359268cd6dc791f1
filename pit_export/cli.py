"""pit-export command line. Exit codes: 0 ok, 2 bad input, 3 gate failed, 4 unavailable here, 130 interrupted."""

from __future__ import annotations

import json
import logging
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

from pit_export.errors import BAD_INPUT_ERRORS, EXIT_BAD_INPUT, EXIT_INTERRUPTED, BadInput, GateFailed, PitError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fold, quantize, export and validate Pseudo-Inverse-Tied (PIT) language models for phones.",
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
STATE = {"debug": False}

CkptArg = Annotated[Path, typer.Argument(help="Checkpoint folder (config.json, model.safetensors, tokenizer.json).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
ThreadsOpt = Annotated[int, typer.Option(help="CPU threads for the runtimes.")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False):
    STATE["debug"] = debug


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
        yield p


def _load(path: Path):
    from pit_export.models.checkpoint import load_checkpoint

    return load_checkpoint(path)


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

    c = _load(ckpt)
    cfg = c.config
    sd = c.model.state_for_checkpoint()
    info = {
        "path": str(ckpt),
        "config": asdict(cfg),
        "params": sum(v.numel() for v in sd.values()),
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
    json_out: JsonOpt = False,
):
    """Fold the Cholesky transform into static matrices (float64 solves) and write a folded PyTorch model."""
    from pit_export.fold import fold, save_folded

    c = _load(ckpt)
    fw, rep = fold(c, layout)
    save_folded(out_dir, fw, rep, c)
    for w in rep.warnings:
        err.print(f"[yellow]warning:[/yellow] {w}")
    _emit({"out": str(out_dir), **asdict(rep)}, json_out, _kv_table(f"folded {ckpt} -> {out_dir}", asdict(rep)))


def _heldout(c, n_windows: int):
    import numpy as np

    from pit_export.models.train import heldout_windows

    return np.asarray(heldout_windows(c.tokenizer, c.config)[:n_windows])


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
        str, typer.Option(help="Layout(s) to fold when no artifact is given: names, comma-separated, or 'all'.")
    ] = "all",
    scheme: Annotated[
        str | None, typer.Option(help="Gate set (fp32, int8, 8da4w, int4); default: the artifact's.")
    ] = None,
    n_windows: Annotated[int, typer.Option(help="Held-out windows for logits and perplexity.")] = 8,
    n_greedy: Annotated[int, typer.Option(help="Greedy tokens compared.")] = 64,
    threads: ThreadsOpt = 2,
    json_out: JsonOpt = False,
):
    """Compare artifacts (or in-memory folds) with the training graph; exit 3 if a gate fails."""
    from pit_export.fold import fold, layouts_for
    from pit_export.runtimes import open_session
    from pit_export.runtimes.pytorch import FoldedSession

    c = _load(ckpt)
    if artifact:
        targets = [(str(a), lambda a=a: open_session(a, threads=threads)) for a in artifact]
    else:
        names = layouts_for(c.config.tying) if layout == "all" else tuple(layout.split(","))
        targets = [(f"fold {n}", lambda n=n: FoldedSession(fold(c, n)[0], threads)) for n in names]
    results = _validate_sessions(c, targets, scheme, n_windows, n_greedy, threads, json_out)
    _emit(
        {"checkpoint": str(ckpt), "results": [r.to_dict() for r in results], "passed": all(r.passed for r in results)},
        json_out,
    )
    e = _gate_error(results)
    if e:
        raise e


def _validate_sessions(ckpt, openers, scheme, n_windows, n_greedy, threads, json_out):
    """Validate each (label, opener) against the training graph; prints tables, returns results."""
    from pit_export.runtimes.pytorch import ReferenceSession
    from pit_export.validate import ValidateConfig
    from pit_export.validate import validate as run_validate

    ref = ReferenceSession(ckpt.model, threads)
    held = _heldout(ckpt, n_windows)
    results = []
    with progress(not json_out) as p:
        for label, opener in openers:
            task = p.add_task(label, total=None)
            sess = opener()
            res = run_validate(
                ref,
                sess,
                held,
                scheme or getattr(sess, "scheme", "fp32"),
                ValidateConfig(n_greedy=n_greedy),
                progress=lambda m, task=task, label=label: p.update(task, description=f"{label}: {m}"),
            )
            sess.close()
            p.remove_task(task)
            results.append(res)
            if not json_out:
                out.print(_result_table(res))
    return results


def _gate_error(results) -> GateFailed | None:
    failed = [
        f"{r.session}: {g.metric}={'missing' if g.value is None else f'{g.value:.4g}'} (gate {g.op} {g.threshold:g})"
        for r in results
        for g in r.failures()
    ]
    return GateFailed("gate failed: " + "; ".join(failed)) if failed else None


@app.command("export")
def export_cmd(
    ckpt: CkptArg,
    target: Annotated[str, typer.Option(help="android | onnx-cpu | ios")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Artifact folder to write.")],
    scheme: Annotated[str | None, typer.Option(help="fp32 | int8 | 8da4w | int4 (default: the target's).")] = None,
    layout: Annotated[str | None, typer.Option(help="untied | shared-z | shared-e (default: the target's).")] = None,
    embedding_bits: Annotated[int | None, typer.Option(help="Quantize the embedding table to 4 or 8 bits.")] = None,
    check: Annotated[bool, typer.Option("--validate/--no-validate", help="Run the gates before writing.")] = True,
    n_windows: Annotated[int, typer.Option(help="Held-out windows for validation.")] = 8,
    n_greedy: Annotated[int, typer.Option(help="Greedy tokens compared.")] = 64,
    threads: ThreadsOpt = 2,
    json_out: JsonOpt = False,
):
    """Fold, quantize and export for a target, validate through the real runtime, then write (exit 3 on a gate)."""
    from pit_export.export import export_artifact
    from pit_export.runtimes import open_session

    c = _load(ckpt)

    def run_checks(folder: Path) -> dict:
        opener = (f"{target} artifact", lambda: open_session(folder, threads=threads))
        results = _validate_sessions(c, [opener], None, n_windows, n_greedy, threads, json_out)
        e = _gate_error(results)
        if e:
            raise e
        return results[0].to_dict()

    with progress(not json_out) as p:
        task = p.add_task(f"export {target}", total=None)

        def step(msg: str):
            p.update(task, description=f"export {target}: {msg}")

        manifest = export_artifact(
            c, target, out_dir, scheme, layout, embedding_bits, step, run_checks if check else None
        )
    sizes = {k: v["bytes"] for k, v in manifest["files"].items()}
    summary = {
        "out": str(out_dir),
        "target": target,
        "scheme": manifest["scheme"],
        "layout": manifest["layout"],
        "files": sizes,
        "validation": manifest.get("validation"),
    }
    if json_out:
        _emit(summary, True)
    else:
        out.print(
            f"[green]wrote[/green] {out_dir} ({manifest['scheme']}, {manifest['layout']}): "
            + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items())
        )


@app.command()
def generate(
    path: Annotated[Path, typer.Argument(help="Checkpoint folder (runs the training graph) or artifact folder.")],
    prompt: Annotated[str, typer.Option(help="Text prompt.")] = "def ",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate (greedy).")] = 64,
    fold_layout: Annotated[str | None, typer.Option("--fold", help="Fold a checkpoint in memory first.")] = None,
    threads: ThreadsOpt = 2,
    json_out: JsonOpt = False,
):
    """Greedy text generation through any session's prefill + decode."""
    import time

    from tokenizers import Tokenizer

    from pit_export.runtimes import greedy_generate, open_session
    from pit_export.runtimes.base import artifact_backend

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
        sess = open_session(path, threads=threads)
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        eos = tok.token_to_id("<|eos|>")
    ids = tok.encode(prompt).ids
    if not ids:
        raise BadInput("prompt encodes to no tokens")
    if len(ids) >= sess.max_seq_len:
        raise BadInput(f"prompt has {len(ids)} tokens; the model's context is {sess.max_seq_len}")
    t0 = time.perf_counter()
    new = greedy_generate(sess, ids, max_new_tokens, {eos} if eos is not None else set())
    dt = time.perf_counter() - t0
    text = tok.decode(new)
    if json_out:
        _emit({"session": sess.name, "prompt": prompt, "tokens": new, "text": text, "seconds": dt}, True)
    else:
        err.print(f"[dim]{sess.name}: {len(new)} tokens in {dt:.2f}s[/dim]")
        out.print(prompt + text, markup=False, highlight=False)
    sess.close()


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
):
    """Train a small model (and BPE tokenizer) on the CPython stdlib corpus: how the default models were made.

    With --from: short distillation of an imported PIT model towards its teacher; KL before/after."""
    from pit_export.models.pit import TYINGS, ModelConfig
    from pit_export.models.train import TrainConfig
    from pit_export.models.train import train as run_train

    if from_ckpt is not None:
        import torch

        from pit_export.adapt import AdaptConfig, adapt

        torch.set_num_threads(threads)
        ac = AdaptConfig(steps=steps or AdaptConfig.steps, train_body=train_body)
        rep = adapt(from_ckpt, out_dir, ac, teacher, progress=lambda m: err.print(f"[dim]{m}[/dim]"))
        out.print(f"KL(teacher || PIT) {rep['before']['kl_mean']:.4f} -> {rep['after']['kl_mean']:.4f} -> {out_dir}")
        return
    steps = steps or 800
    if tying not in TYINGS:
        raise BadInput(f"--tying must be one of {TYINGS}")
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
        )
    out.print(f"held-out perplexity {m['heldout_ppl']:.2f} (unigram {m['unigram_ppl']:.2f}) -> {out_dir}")


@app.command("import-hf")
def import_hf_cmd(
    src: Annotated[
        Path, typer.Argument(help="Local HF Llama-family folder (config.json, *.safetensors, tokenizer.json).")
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="PIT checkpoint folder to write.")],
    init: Annotated[str, typer.Option(help="T: identity | input (embeddings exact) | output (head exact).")] = "output",
    max_seq_len: Annotated[int, typer.Option(help="Context of the imported model (capped by the teacher's).")] = 512,
    n_windows: Annotated[int, typer.Option(help="Held-out windows for the teacher-vs-PIT KL.")] = 4,
    threads: ThreadsOpt = 2,
    json_out: JsonOpt = False,
):
    """Import a Hugging Face Llama-family checkpoint as PIT (polar decomposition of its table) and report the KL."""
    import torch

    from pit_export.hf_import import import_hf

    torch.set_num_threads(threads)
    rep = import_hf(src, out_dir, init, max_seq_len, n_windows, progress=lambda m: err.print(f"[dim]{m}[/dim]"))
    _emit({"out": str(out_dir), **asdict(rep)}, json_out, _kv_table(f"imported {src} -> {out_dir}", asdict(rep)))


def main():
    """Console entry point: one-line errors and distinct exit codes instead of tracebacks.

    click (standalone) handles --help and usage errors (exit 2); our errors carry their own exit code."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # toolchain import chatter (torchao's optional CUDA kernels, torch pytree deprecations) is not the user's problem
    if "--debug" not in sys.argv:
        logging.getLogger("torchao").setLevel(logging.ERROR)
        logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    signal.signal(signal.SIGINT, _interrupted)
    try:
        app()
    except (*BAD_INPUT_ERRORS, PitError) as e:
        if STATE["debug"]:
            raise
        code = e.exit_code if isinstance(e, PitError) else EXIT_BAD_INPUT
        err.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(code)
    except (OSError, ValueError, RuntimeError) as e:
        if STATE["debug"]:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        err.print(f"[red]error:[/red] {type(e).__name__}: {first}", highlight=False)
        sys.exit(1)


class Interrupted(PitError):
    exit_code = EXIT_INTERRUPTED


def _interrupted(signum, frame):
    # Not KeyboardInterrupt: click would turn that into "Aborted!" with exit 1.
    raise Interrupted("interrupted")


if __name__ == "__main__":
    main()

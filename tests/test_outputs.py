"""Output safety: no command removes or changes a file pit-export did not write.

Every writing command (fold, export, import-hf, train, train --from, bench --out) is pointed at outputs that are,
contain or lie inside one of its inputs (also through `.` and symlinks), at folders with the user's files, and at
symlinks, always with --force: each must end with exit 5, one stderr line, no traceback, and every file under the
test's folder byte-identical. A previous pit-export output is replaced by --force, and only while it is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pit_export.models.checkpoint import MARKER, _renameat2_exchange, atomic_dir, foreign_files

from pit_export.errors import EXIT_OUTPUT

from .conftest import DEFAULT_MODEL, ROOT, TIED_MODEL
from .test_faults import cli

TINY_HF = dict(vocab_size=4096, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    """A tiny tied Llama checkpoint saved by transformers, as on the Hub."""
    from pit_export.models.pit import ModelConfig

    from .hf_models import save_hf

    d = tmp_path_factory.mktemp("hf") / "llama"
    save_hf(d, ModelConfig(**TINY_HF, tying="tied"), DEFAULT_MODEL / "tokenizer.json", seed=3)
    return d


def tree(root: Path) -> dict[str, object]:
    """Every path under root: file bytes, symlink targets, folders."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = p.read_bytes()
    return out


def refused(capsys, argv, root: Path) -> str:
    before = tree(root)
    code, err = cli(capsys, argv)
    lines = err.strip().splitlines()
    assert code == EXIT_OUTPUT, err
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    assert "internal error" not in lines[0]
    assert tree(root) == before, "a pre-existing file was changed or removed, or something was written"
    return lines[0]


# ---------------------------------------------------------------- commands and their inputs

# name -> (which input the case is about, argv builder (input, out, hf) -> argv)
COMMANDS = {
    "fold": ("ckpt", lambda i, o, hf: ["fold", i, "--out", o]),
    "export": ("ckpt", lambda i, o, hf: ["export", i, "--target", "onnx-cpu", "--out", o]),
    "export --baseline": (
        "tied",
        lambda i, o, hf: ["export", DEFAULT_MODEL, "--target", "onnx-cpu", "--baseline", i, "--out", o],
    ),
    "import-hf": ("hf", lambda i, o, hf: ["import-hf", i, "--out", o]),
    "train --tokenizer-from": ("ckpt", lambda i, o, hf: ["train", "--out", o, "--steps", "1", "--tokenizer-from", i]),
    "train --from": ("ckpt", lambda i, o, hf: ["train", "--from", i, "--teacher", hf, "--out", o, "--steps", "1"]),
    "train --teacher": ("hf", lambda i, o, hf: ["train", "--from", DEFAULT_MODEL, "--teacher", i, "--out", o]),
}


def make_input(kind: str, proj: Path, hf_src: Path) -> Path:
    src = {"ckpt": DEFAULT_MODEL, "tied": TIED_MODEL, "hf": hf_src}[kind]
    dest = proj / "mine"
    shutil.copytree(src, dest)
    return dest


# variant -> (out given the input and the test root, extra setup); every variant runs with --force
def _user_folder(root: Path, inp: Path) -> Path:
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("my notes\n")
    return root / "notes"


def _link_to_input(root: Path, inp: Path) -> Path:
    (root / "link").symlink_to(inp, target_is_directory=True)
    return root / "link"


VARIANTS = {
    "same folder": lambda root, inp: inp,
    "inside the input": lambda root, inp: inp / "out",
    "parent": lambda root, inp: inp.parent,
    "grandparent": lambda root, inp: inp.parent.parent,
    "dot": lambda root, inp: Path("."),
    "symlink to the input": _link_to_input,
    "folder with user files": _user_folder,
    "relative path into the input": lambda root, inp: Path("proj/./mine/../mine"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_output_conflicts_are_refused(command, variant, tmp_path, capsys, monkeypatch, hf_src):
    kind, argv = COMMANDS[command]
    root = tmp_path / "root"
    inp = make_input(kind, root / "proj", hf_src)
    monkeypatch.chdir(inp.parent if variant == "dot" else root)
    out = VARIANTS[variant](root, inp)
    line = refused(capsys, [*argv(inp, out, hf_src), "--force"], root)
    assert any(w in line for w in ("input", "did not write", "symbolic link")), line


@pytest.mark.parametrize("command", ["fold", "export", "import-hf"])
def test_input_given_through_a_symlink(command, tmp_path, capsys, monkeypatch, hf_src):
    """The input named by a link, the output its real folder (or the other way round): resolved, still refused."""
    kind, argv = COMMANDS[command]
    root = tmp_path / "root"
    inp = make_input(kind, root / "proj", hf_src)
    link = _link_to_input(root, inp)
    assert "is the input" in refused(capsys, [*argv(link, inp, hf_src), "--force"], root)
    assert "lies inside the input" in refused(capsys, [*argv(link, inp / "sub", hf_src), "--force"], root)


def test_gate_file_is_an_input(tmp_path, capsys):
    root = tmp_path / "root"
    (root / "cfg").mkdir(parents=True)
    gates = root / "cfg" / "gates.json"
    gates.write_text('{"fp32": {"top1": [">=", 0.9]}}')
    for out in (gates, gates.parent, root):
        argv = ["export", DEFAULT_MODEL, "--target", "onnx-cpu", "--gates", gates, "--out", out, "--force"]
        refused(capsys, argv, root)


def test_output_symlink_is_never_replaced(tmp_path, capsys):
    """A link named as the output: even to a pit-export output folder, the link is the user's."""
    root = tmp_path / "root"
    root.mkdir()
    assert cli(capsys, ["fold", DEFAULT_MODEL, "--out", root / "real"])[0] == 0
    (root / "link").symlink_to(root / "real", target_is_directory=True)
    assert "symbolic link" in refused(capsys, ["fold", DEFAULT_MODEL, "--out", root / "link", "--force"], root)


# ---------------------------------------------------------------- bench --out (a file)


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    from pit_export.models.checkpoint import load_checkpoint

    from pit_export.fold import fold, save_folded

    ck = load_checkpoint(DEFAULT_MODEL)
    return save_folded(tmp_path_factory.mktemp("folded") / "art", *fold(ck, "untied"), ck)


def test_bench_out_refuses_user_files_and_the_artifact(tmp_path, capsys, folded):
    root = tmp_path / "root"
    art = root / "art"
    shutil.copytree(folded, art)
    (root / "notes.json").write_text('{"mine": true}\n')
    (root / "notes.txt").write_text("not json\n")
    (root / "link.json").symlink_to(root / "notes.json")
    for out in (
        art,
        art / "bench.json",
        art / "pit_export.json",
        root / "notes.json",
        root / "notes.txt",
        root / "link.json",
        root,
    ):
        refused(capsys, ["bench", art, "--out", out, "--repeats", "1"], root)


def test_bench_out_accepts_an_earlier_result(tmp_path, folded):
    from pit_export.bench import check_out_file

    earlier = tmp_path / "bench.json"
    shutil.copy(ROOT / "benchmarks" / "results" / "bench-onnx-host.json", earlier)
    check_out_file(earlier, folded)  # an earlier pit-export bench result may be replaced
    check_out_file(tmp_path / "new.json", folded)


# ---------------------------------------------------------------- what --force does replace


REPLACE = {
    "fold": lambda o, hf: ["fold", DEFAULT_MODEL, "--out", o],
    "export": lambda o, hf: [
        "export",
        DEFAULT_MODEL,
        "--target",
        "onnx-cpu",
        "--scheme",
        "fp32",
        "--no-validate",
        "--out",
        o,
    ],
    "import-hf": lambda o, hf: ["import-hf", hf, "--out", o, "--n-windows", "1", "--max-seq-len", "64"],
    "train": lambda o, hf: ["train", "--out", o, "--steps", "1", "--tokenizer-from", DEFAULT_MODEL],
}


@pytest.mark.parametrize("command", list(REPLACE))
def test_force_replaces_only_its_own_untouched_output(command, tmp_path, capsys, hf_src):
    root = tmp_path / "root"
    root.mkdir()
    out = root / "out"
    argv = REPLACE[command](out, hf_src)
    assert cli(capsys, argv)[0] == 0
    assert foreign_files(out) is None and (out / MARKER).is_file()
    # without --force: refused, untouched
    assert "--force" in refused(capsys, argv, root)
    # with it: replaced by a complete new folder (a new inode), marker and listing consistent
    inode = out.stat().st_ino
    assert cli(capsys, [*argv, "--force"])[0] == 0
    assert out.stat().st_ino != inode and foreign_files(out) is None
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    # a file the user added, or an edit to one of ours: the folder is no longer pit-export's alone
    (out / "my-notes.md").write_text("keep me\n")
    assert "my-notes.md" in refused(capsys, [*argv, "--force"], root)
    (out / "my-notes.md").unlink()
    victim = next(p for p in sorted(out.rglob("*.json")) if p.name != MARKER)
    victim.write_text(victim.read_text() + " ")
    assert victim.name in refused(capsys, [*argv, "--force"], root)


def test_empty_folder_is_used(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli(capsys, ["fold", DEFAULT_MODEL, "--out", tmp_path / "empty"])[0] == 0
    assert (tmp_path / "empty" / "folded.safetensors").is_file()


def test_marker_without_listing_is_not_trusted(tmp_path, capsys):
    """A hand-written marker that does not list the files (or names another writer) protects nothing."""
    root = tmp_path / "root"
    (root / "o").mkdir(parents=True)
    (root / "o" / "data.bin").write_bytes(b"\0" * 10)
    for doc in ({"written_by": "pit-export"}, {"written_by": "someone", "files": {"data.bin": 10}}, "not json"):
        (root / "o" / MARKER).write_text(doc if isinstance(doc, str) else json.dumps(doc))
        refused(capsys, ["fold", DEFAULT_MODEL, "--out", root / "o", "--force"], root)


# ---------------------------------------------------------------- the swap itself


def test_exchange_is_atomic_here(tmp_path):
    """renameat2(RENAME_EXCHANGE) swaps two folders in one step (the path --force takes on Linux)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    assert _renameat2_exchange(a, b)
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_old_folder_hidden_by_a_killed_two_rename_swap_comes_back(tmp_path):
    """Where exchange is unsupported the swap is two renames; a process killed between them leaves the old folder
    hidden beside a complete new one. The next run into that parent puts the old one back and removes the rest."""

    def write(text):
        return lambda tmp: (tmp / "f.txt").write_text(text)

    dest = tmp_path / "out"
    atomic_dir(dest, write("old"))
    pid = _dead_pid()
    dest.rename(tmp_path / f".out.pit-tmp-{pid}-old")  # the state after the first rename
    (tmp_path / f".out.pit-tmp-{pid}-abc").mkdir()  # the new folder, not yet renamed
    atomic_dir(tmp_path / "other", write("x"))  # any later run into the same parent
    assert (dest / "f.txt").read_text() == "old" and foreign_files(dest) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]
    atomic_dir(dest, write("new"), force=True)
    assert (dest / "f.txt").read_text() == "new"

"""Checkpoint folder = config.json + model.safetensors + tokenizer.json. Loading checks what it loads.

Every violation raises CheckpointError with one line that names the tensor and the number.
Weights are read with safetensors only (never unpickled).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer

from pit_export.errors import CheckpointError, OutputError

from .pit import ModelConfig, Transformer, cache_bytes, expected_shapes, shown

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"
CHECKSUM = "model.safetensors.sha256"  # written on save, verified on load when present: catches any flipped bit
# Z^T Z = I is checked at fp32 resolution: a QR/polar factor stored in fp32 deviates by ~sqrt(V) * 2^-24.
ORTHO_TOL = 1e-4


# CheckpointError and OutputError live with the other exit-code errors (pit_export.errors), re-exported here.


# write failures that are about the destination, not about our data
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
# Z^T Z = I holds to fp32 resolution; T beyond this condition number loses more than half the fp32 digits in the fold
MAX_COND_T = 1e8


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    model: Transformer
    tokenizer: Tokenizer
    ortho_error: float | None  # max |Z^T Z - I| for PIT checkpoints

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))


def orthonormality_error(z: torch.Tensor) -> float:
    z = z.double()
    return (z.T @ z - torch.eye(z.shape[1], dtype=torch.float64)).abs().max().item()


# ---------------------------------------------------------------- the config against the weights' header
#
# Everything a config could make us allocate (layers, tables, caches) is checked against the safetensors header (names,
# shapes, dtypes: no tensor data read) and against fixed bounds first, so a corrupted or hostile config.json is one
# line and exit 2 in milliseconds, not an allocator failure after gigabytes.

MAX_CONFIG_BYTES = 1 << 20  # a model config is a few hundred bytes (an HF one a few KB)
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
ST_SIZES |= {"U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
ST_FLOATS = {"F64", "F32", "F16", "BF16"}
Header = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (safetensors dtype, shape)


def read_json(path: Path, what: str = "config", limit: int = MAX_CONFIG_BYTES):
    """A small JSON file, refused unread when it is larger than any real one."""
    size = path.stat().st_size
    if size > limit:
        raise CheckpointError(f"{path}: {size:,} bytes, beyond the {limit:,} a {what} can take")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not JSON ({str(e).splitlines()[0][:120]})") from None


def read_header(path: Path) -> Header:
    """The safetensors header of `path`, checked for self-consistency (offsets within the file, sizes matching
    shapes and dtypes); reads the first 8 + header bytes only."""
    size = path.stat().st_size

    def bad(why: str):
        return CheckpointError(f"{path}: unreadable safetensors ({why})")

    with open(path, "rb") as f:
        if size < 8:
            raise bad(f"{size} bytes, shorter than the header length")
        n = int.from_bytes(f.read(8), "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise bad(f"header length {n:,} beyond the file's {size:,} bytes")
        try:
            doc = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise bad("header is not JSON") from None
    if not isinstance(doc, dict):
        raise bad("header is not a JSON object")
    out: Header = {}
    data = size - 8 - n
    for name, e in doc.items():
        if name == "__metadata__":
            continue
        ok = isinstance(e, dict) and e.get("dtype") in ST_SIZES and isinstance(e.get("shape"), list)
        ok = ok and all(type(d) is int and d >= 0 for d in e["shape"]) and isinstance(e.get("data_offsets"), list)
        ok = ok and len(e["data_offsets"]) == 2 and all(type(o) is int for o in e["data_offsets"])
        if not ok:
            raise bad(f"entry {shown(name)} malformed")
        a, b = e["data_offsets"]
        nbytes = math.prod(e["shape"]) * ST_SIZES[e["dtype"]]
        if not 0 <= a <= b <= data or b - a != nbytes:
            raise bad(f"tensor {shown(name)} lies outside the file or disagrees with its shape")
        out[name] = (e["dtype"], tuple(e["shape"]))
    return out


_LAYER = re.compile(r"^layers\.(\d+)\.")


def layer_count(names, pattern: re.Pattern = _LAYER) -> tuple[int, int | None]:
    """(layers present, first missing index below the highest) from tensor names like layers.N.…"""
    ids = sorted({int(m.group(1)) for n in names if (m := pattern.match(n))})
    gap = next((i for i, j in enumerate(ids) if i != j), None)
    return len(ids), gap


def check_header(
    cfg: ModelConfig, header: Header, config_name: str = CONFIG, keys=None, strict: bool = True, label=None
) -> None:
    """The config against the weights' header (in training-graph tensor names), before anything is built from it: the
    layer count first (it sizes everything else), then the sizes a tensor states, then every tensor's name, shape and
    dtype. `keys` names the config's keys as the file spells them (an HF config's num_hidden_layers, ...), `label`
    the tensors; `strict`: a tensor the config does not call for is an error (a PIT checkpoint), else ignored (an HF
    folder's extras)."""
    key = (keys or {}).get
    label = label or (lambda name: name)
    if strict:
        for name, (dt, _) in sorted(header.items()):
            if dt not in ST_FLOATS:
                raise CheckpointError(f"tensor {label(name)} has dtype {dt}, expected a float dtype")
    n, gap = layer_count(header)
    if n == 0:
        raise CheckpointError(
            f"tensor {label('layers.0.attention_norm.weight')} missing: the weights hold no layers ({config_name} "
            f"{key('n_layers', 'n_layers')}={shown(cfg.n_layers)})"
        )
    if gap is not None:
        raise CheckpointError(f"tensors of layer {gap} missing: the weights hold {n} layers, not numbered 0..{n - 1}")
    if cfg.n_layers != n:
        raise CheckpointError(
            f"{config_name} {key('n_layers', 'n_layers')}={shown(cfg.n_layers)}, but the weights hold {n} layers"
        )
    table = "pit.z" if cfg.tying == "pit" else "tok_embeddings.weight"
    derived = []  # (config field, value the weights imply, the tensor that says so)
    if table in header and len(header[table][1]) == 2:
        v, d = header[table][1]
        derived += [("vocab_size", v, table), ("dim", d, table)]
    w1 = header.get("layers.0.feed_forward.w1.weight")
    if w1 and len(w1[1]) == 2:
        derived.append(("ffn_dim", w1[1][0], "layers.0.feed_forward.w1.weight"))
    wk = header.get("layers.0.attention.wk.weight")
    if wk and len(wk[1]) == 2 and wk[1][0] % cfg.head_dim == 0:
        derived.append(("n_kv_heads", wk[1][0] // cfg.head_dim, "layers.0.attention.wk.weight"))
    for field, want, tensor in derived:
        if getattr(cfg, field) != want:
            name = key(field, field)
            raise CheckpointError(
                f"{config_name} {name}={shown(getattr(cfg, field))} disagrees with the weights: {label(tensor)} has "
                f"shape {list(header[tensor][1])} ({name} {want})"
            )
    want = expected_shapes(cfg)
    for name in sorted(set(want) - set(header)):
        raise CheckpointError(f"tensor {label(name)} missing (expected shape {list(want[name])})")
    if strict:
        for name in sorted(set(header) - set(want)):
            raise CheckpointError(f"unexpected tensor {name} {list(header[name][1])} for tying={cfg.tying}")
    for name, shape in want.items():
        dt, have = header[name]
        if have != shape:
            raise CheckpointError(f"tensor {label(name)} has shape {list(have)}, config implies {list(shape)}")
        if dt not in ST_FLOATS:
            raise CheckpointError(f"tensor {label(name)} has dtype {dt}, expected a float dtype")


# the caches are held up to this many times at once: the exporter's module, the traced program, the runtime's copy
CACHE_COPIES = 3


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (physical memory where that is missing), bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_context(cfg: ModelConfig, where: str | Path = CONFIG) -> None:
    """A context this machine can hold: every target allocates its KV caches and RoPE tables at max_seq_len."""
    need, have = CACHE_COPIES * cache_bytes(cfg), available_memory()
    if need > have:
        gib = 2**30
        raise CheckpointError(
            f"{where}: max_seq_len={cfg.max_seq_len:,} needs ~{need / gib:.1f} GiB for the KV caches and RoPE tables "
            f"({CACHE_COPIES} copies at the peak); this machine has {have / gib:.1f} GiB available: lower max_seq_len"
        )


def check_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> float | None:
    """Finiteness and PIT invariants (names, shapes and dtypes were checked on the header). Returns max |Z^T Z - I|
    for PIT."""
    for name, t in tensors.items():
        bad = (~torch.isfinite(t)).sum().item()
        if bad:
            raise CheckpointError(f"tensor {name} has {bad} non-finite values")
    if cfg.tying != "pit":
        return None
    l = tensors["pit.l"].double()
    upper = torch.triu(l, 1).abs().max().item()
    if upper > 0:
        raise CheckpointError(f"tensor pit.l is not lower-triangular (max |upper| = {upper:.3g})")
    dmin = torch.diagonal(l).min().item()
    if dmin <= 0:
        raise CheckpointError(f"tensor pit.l has a non-positive diagonal (min = {dmin:.3g}); T = L L^T is not SPD")
    sv = torch.linalg.svdvals(l)
    cond = (sv.max() / sv.min()).item() ** 2  # T = L L^T
    if not cond <= MAX_COND_T:
        raise CheckpointError(f"tensor pit.l gives cond(T) = {cond:.3g} > {MAX_COND_T:g}; the fold would be inexact")
    err = orthonormality_error(tensors["pit.z"])
    if err > ORTHO_TOL:
        raise CheckpointError(f"tensor pit.z is not orthonormal: max |Z^T Z - I| = {err:.3g} > {ORTHO_TOL:g}")
    return err


def read_tokenizer(folder: Path, vocab_size: int) -> Tokenizer:
    """folder/tokenizer.json, which must have exactly vocab_size tokens."""
    if not (folder / TOKENIZER).is_file():
        raise CheckpointError(f"{folder}: {TOKENIZER} missing")
    try:
        tok = Tokenizer.from_file(str(folder / TOKENIZER))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise CheckpointError(f"{folder / TOKENIZER}: unreadable tokenizer ({str(e).splitlines()[0]})") from None
    if tok.get_vocab_size() != vocab_size:
        raise CheckpointError(f"tokenizer has {tok.get_vocab_size()} tokens, config vocab_size={vocab_size}")
    return tok


def read_config(path: Path) -> ModelConfig:
    """A PIT checkpoint's (or artifact's) config.json: bounded read, every key present and of its type."""
    doc = read_json(path / CONFIG)
    try:
        return ModelConfig.from_dict(doc)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG}: {str(e).splitlines()[0]}") from None


def artifact_config(folder: Path) -> ModelConfig:
    """An artifact's config.json, checked as a checkpoint's is, and its context against this machine's memory: before
    any runtime opens it (a runtime allocates its caches from these numbers)."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise CheckpointError(f"{folder}: {CONFIG} missing (not an artifact folder)")
    cfg = read_config(folder)
    check_context(cfg, folder / CONFIG)
    return cfg


SHIPPED = Path(__file__).resolve().parent  # the models shipped with the package: pit-tiny, tied-tiny


def shipped_models() -> list[str]:
    return sorted(p.name for p in SHIPPED.iterdir() if (p / CONFIG).is_file())


def resolve_model(path: str | os.PathLike) -> Path:
    """A checkpoint folder as given, or, when no such path exists and it is a bare name, the shipped model of that name
    (`pit-export inspect pit-tiny` from any folder, an installed package included)."""
    p = Path(path)
    if p.exists() or p.is_symlink() or len(p.parts) != 1:
        return p
    return SHIPPED / p.name if (SHIPPED / p.name / CONFIG).is_file() else p


def load_checkpoint(path: str | os.PathLike, runtime: bool = True) -> Checkpoint:
    """Config, then the weights' header against it, then (with `runtime`: the caller will export or run it) the
    context against this machine's memory, and only then the tensors. `path` may name a shipped model."""
    path = resolve_model(path)
    if not path.is_dir():
        names = ", ".join(shipped_models())
        raise CheckpointError(f"{path}: not a checkpoint folder (nor a shipped model: {names})")
    for f in (CONFIG, WEIGHTS, TOKENIZER):
        if not (path / f).is_file():
            raise CheckpointError(f"{path}: {f} missing")
    cfg = read_config(path)
    check_header(cfg, read_header(path / WEIGHTS))
    if runtime:
        check_context(cfg, path / CONFIG)
    try:
        tensors = load_file(path / WEIGHTS)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path / WEIGHTS}: unreadable safetensors ({str(e).splitlines()[0]})") from None
    tensors = {k: v.float() for k, v in tensors.items()}
    ortho = check_tensors(cfg, tensors)
    tok = read_tokenizer(path, cfg.vocab_size)
    if (path / CHECKSUM).is_file():
        want = (path / CHECKSUM).read_text().split()[0] if (path / CHECKSUM).read_text().strip() else ""
        if file_sha256(path / WEIGHTS) != want:
            raise CheckpointError(f"{path / WEIGHTS}: sha256 differs from {CHECKSUM} (corrupted or modified file)")
    model = Transformer.from_checkpoint_state(cfg, tensors)
    return Checkpoint(path, cfg, model, tok, ortho)


# Every folder pit-export writes carries this file: the files it wrote and their sizes. `--force` replaces only a
# folder whose every file is listed here, unchanged in size; anything else in an output location is the user's.
MARKER = ".pit-export.json"


def _listing(root: Path) -> dict[str, int]:
    """Relative path -> size of every file and symlink under root (symlinks not followed), the marker excluded."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            if rel != MARKER:
                out[rel] = -1 if p.is_symlink() else p.lstat().st_size
    return out


def write_marker(root: Path) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("pit-export")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without an install
        ver = "unknown"
    doc = {"written_by": "pit-export", "version": ver, "files": dict(sorted(_listing(root).items()))}
    (root / MARKER).write_text(json.dumps(doc, indent=1) + "\n")


def foreign_files(root: Path) -> list[str] | None:
    """None if pit-export wrote `root` and nothing in it changed since; else the files that are not its own
    (unlisted, or a listed file whose size changed). An empty folder has none."""
    have = _listing(root)
    try:
        doc = json.loads((root / MARKER).read_text()) if (root / MARKER).is_file() else None
    except (OSError, ValueError):
        doc = None
    if not isinstance(doc, dict) or doc.get("written_by") != "pit-export" or not isinstance(doc.get("files"), dict):
        return sorted(have) if have or (root / MARKER).exists() else None
    wrote = doc["files"]
    foreign = sorted(f for f, n in have.items() if wrote.get(f) != n)
    return foreign or None


def within(a: Path, b: Path) -> bool:
    """a is b or lies inside b (resolved paths)."""
    return a == b or b in a.parents


def check_output(dest: Path, force: bool, inputs=()) -> None:
    """Refuse, before any work, an output that would remove or change what pit-export did not write.

    The output must not be, contain or lie inside an input (resolved, symlinks followed); an existing folder is used
    only if it is empty, or replaced with `force` only if pit-export wrote it (its marker lists every file)."""
    dest = Path(dest)
    if dest.is_symlink():
        raise OutputError(f"{dest} is a symbolic link; pass the folder itself as the output (links are never replaced)")
    out = dest.resolve()
    for i in inputs:
        if i is None:
            continue
        src = Path(i).resolve()
        if out == src:
            raise OutputError(f"output {dest} is the input {i}; choose another output folder")
        if within(src, out):
            raise OutputError(f"output {dest} contains the input {i}; choose another output folder")
        if within(out, src):
            raise OutputError(f"output {dest} lies inside the input {i}; choose a folder outside it")
    if not dest.exists():
        return
    if not dest.is_dir():
        raise OutputError(f"{dest} exists and is not a folder; pit-export replaces only folders it wrote")
    foreign = foreign_files(dest)
    if foreign is not None:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(
            f"{dest} holds files pit-export did not write or that changed since ({shown}); --force replaces only "
            "pit-export's own untouched output folders: choose another --out, or move those files away"
        )
    if any(dest.iterdir()) and not force:
        raise OutputError(f"{dest} exists; pass --force to replace it")


def atomic_dir(dest: Path, write, force: bool = False, inputs=()) -> Path:
    """Build a folder in a temporary sibling, fsync it, then swap it into place: never a partial artifact.

    check_output decides whether `dest` may be used: absent or empty, or (with `force`) a folder pit-export wrote,
    untouched since; it runs again right before the swap. The swap is one renameat2(RENAME_EXCHANGE), so `dest`
    always holds the old or the new folder, whatever kills the process; where the filesystem cannot exchange, two
    renames, and a later run puts back an old folder that a kill left hidden. Failures of the destination (full
    disk, read-only, permissions) become OutputError; any exception removes the temporary folder, and so does an
    interrupt (the signal handler removes what PENDING lists). Temporaries left by a killed process (SIGKILL cannot
    be caught) carry its pid and are removed by the next run."""
    dest = Path(dest)
    if dest.parent.is_dir():
        _remove_orphans(dest)  # first: it may put back an old folder that a killed run left hidden
    check_output(dest, force, inputs)
    tmp = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _signals_deferred():  # registered as soon as it exists, so an interrupt always finds it
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{_TMP_TAG}{os.getpid()}-", dir=dest.parent))
            PENDING.add(tmp)
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 is for the temporary; the output gets the usual mode
        write(tmp)
        write_marker(tmp)
        _fsync_tree(tmp)
        check_output(dest, force, inputs)  # the folder may have changed while we worked
        with _signals_deferred():
            if dest.exists():
                _swap_in(tmp, dest)  # tmp now holds the old folder, removed below
            else:
                tmp.rename(dest)
                PENDING.discard(tmp)
                tmp = None
    except Exception as e:
        reason = e.reason if isinstance(e, OutputError) else _output_failure(e)
        if reason is None:
            raise
        # named after the folder the user asked for, not a nested temporary one
        raise OutputError(f"{dest}: cannot write ({reason})", reason) from None
    finally:
        if tmp is not None:
            PENDING.discard(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2); False where the kernel or filesystem cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(tmp: Path, dest: Path) -> None:
    """Put the complete folder `tmp` at `dest`; afterwards `tmp` holds the previous `dest`."""
    if _renameat2_exchange(tmp, dest):
        return
    old = dest.parent / f".{dest.name}.{_TMP_TAG}{os.getpid()}-old"  # restored by the next run if we die here
    dest.rename(old)
    tmp.rename(dest)
    old.rename(tmp)


PENDING: set[Path] = set()  # this process's temporary folders: an interrupt removes them before it exits


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary folder that an interrupt (SIGINT/SIGTERM) removes too, unlike tempfile.TemporaryDirectory."""
    with _signals_deferred():
        tmp = Path(tempfile.mkdtemp(prefix="pit-export-"))
        PENDING.add(tmp)
    try:
        yield tmp
    finally:
        PENDING.discard(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def remove_pending() -> None:
    for p in list(PENDING):
        shutil.rmtree(p, ignore_errors=True)


_TMP_TAG = "pit-tmp-"  # .NAME.pit-tmp-PID-XXXX: the pid tells whether its writer is still running


def _remove_orphans(dest: Path) -> None:
    """Temporaries of dead pit-export processes go; an old folder a killed two-rename swap left hidden comes back."""
    for p in sorted(dest.parent.glob(f".*.{_TMP_TAG}*"), key=lambda p: not p.name.endswith("-old")):
        pid = p.name.rsplit(_TMP_TAG, 1)[1].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        target = dest.parent / p.name[1:].rsplit(f".{_TMP_TAG}", 1)[0]
        if p.name.endswith("-old") and not target.exists() and not target.is_symlink():
            try:
                p.rename(target)
            except OSError:
                pass  # left where it is for a later run, never removed
        else:
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _signals_deferred():
    sigs = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)


def _output_failure(e: Exception) -> str | None:
    """The destination's fault? OSErrors say so by errno; native writers (safetensors, onnxruntime) only in text."""
    if isinstance(e, OSError) and e.errno in _OUTPUT_ERRNOS:
        return e.strerror or str(e)
    text = str(e)
    for errnum in (errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EDQUOT):
        msg = os.strerror(errnum)
        if msg in text or f"os error {errnum})" in text:
            return msg
    return None


def _fsync_tree(root: Path) -> None:
    """Data on disk before the rename makes it visible (a crash after the rename must not expose empty files)."""
    for p in sorted(root.rglob("*"), reverse=True):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """The safetensors format, written one tensor at a time: safetensors.torch.save_file first serialises every
    tensor into one buffer, a second copy of the model in memory. Widest dtypes first keeps every offset aligned."""
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict = {"__metadata__": metadata} if metadata else {}
    off = 0
    for k, t in items:
        n = t.numel() * t.element_size()
        header[k] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for _, t in items:
            f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def save_checkpoint(
    dest, model: Transformer, tokenizer: Tokenizer, extra_files: dict[str, str] | None = None, force: bool = False
):
    def write(tmp: Path):
        (tmp / CONFIG).write_text(model.cfg.to_json())
        save_tensors(model.state_for_checkpoint(), tmp / WEIGHTS, {"format": "pt", "tying": model.cfg.tying})
        (tmp / CHECKSUM).write_text(file_sha256(tmp / WEIGHTS) + "\n")
        tokenizer.save(str(tmp / TOKENIZER))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    return atomic_dir(Path(dest), write, force)

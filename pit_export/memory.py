"""Give freed heap back to the OS between pipeline stages, or never take it (run_forked).

glibc serves the many mid-sized tensors of a stage (fold's float64 chunks, a toolchain's temporaries) from its heap
and keeps the pages after they are freed, so the next stage would start from the previous one's high-water mark.
malloc_trim(0) returns them; a no-op where glibc is not the allocator."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import signal
import sys
from collections.abc import Callable


def _libc_function(name: str):
    """A function of the C library on Linux (None elsewhere, or where this libc lacks it: musl has no malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


_TRIM = _libc_function("malloc_trim")
# Folded weights above this run a toolchain's heavy steps in forked children (run_forked); small ones gain nothing.
FORK_ABOVE_BYTES = 256 * 2**20


def release_memory() -> None:
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)


_MADVISE = _libc_function("madvise")
_MADV_DONTNEED = 4


def release_file_pages(path, dead, live) -> int:
    """Give back the resident pages of memory-mapped file `path` that only `dead` tensors used; returns bytes given.

    safetensors maps a checkpoint once for all its tensors, and the mapping lives while any of them does: once folded,
    Z's pages would stay resident beside the folded tables as long as a layer weight (which the folded weights share)
    is alive. Only pages inside a mapping of `path` and outside every `live` tensor are dropped; no `dead` tensor may be
    read afterwards (a page written in place would lose the write; a clean one would be read again from the file)."""
    if _MADVISE is None:
        return 0
    page, target = os.sysconf("SC_PAGE_SIZE"), os.path.realpath(path)
    mapped = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == target:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                mapped.append((lo, hi))
    keep = sorted((t.data_ptr() // page * page, -(-(t.data_ptr() + t.nbytes) // page) * page) for t in live)
    given = 0
    for t in dead:
        lo, hi = -(-t.data_ptr() // page) * page, (t.data_ptr() + t.nbytes) // page * page
        if hi <= lo or not any(a <= lo and hi <= b for a, b in mapped):
            continue
        for a, b in keep:  # cut out live tensors' pages: what is left are [lo, a) pieces
            if a < hi and lo < b:
                given += _advise(lo, a)
                lo = max(lo, b)
        given += _advise(lo, hi)
    return given


def _advise(lo: int, hi: int) -> int:
    if hi <= lo:
        return 0
    _MADVISE(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)
    return hi - lo


def run_forked(fn: Callable[[], None]) -> None:
    """Run `fn` in a forked child and wait for it: whatever heap it leaves behind (a tracer's graphs kept by reference
    cycles, pymalloc arenas that never shrink) goes back to the OS with the child, while the tensors the parent
    already holds are shared copy-on-write, not copied. `fn` communicates through files.

    Its failure is raised here, as the same exception type when that is one of ours, else as a RuntimeError naming
    it. Where fork is unsafe or missing (macOS frameworks, Windows), `fn` runs in this process."""
    if not sys.platform.startswith("linux"):
        fn()
        return
    read_end, write_end = os.pipe()
    gc.collect()
    gc.freeze()  # the collector would otherwise touch (and so copy) every object page the child inherits
    try:
        pid = os.fork()
    except OSError:
        gc.unfreeze()
        os.close(read_end)
        os.close(write_end)
        raise
    if pid == 0:  # child: never returns to the caller's frames, so no finally/with block of theirs runs twice
        os.close(read_end)
        status = 0
        try:
            _child_setup()
            fn()
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent as one line
            status = 1
            os.write(write_end, json.dumps({"type": type(e).__name__, "message": str(e)}).encode())
        finally:
            os._exit(status)
    gc.unfreeze()
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as r:
            report = r.read()  # EOF when the child exits
        _, status = os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    if status == 0:
        return
    if not report:
        raise RuntimeError(f"forked worker died ({_describe(status)})")
    failure = json.loads(report)
    raise _rebuild(failure["type"], failure["message"])


def _child_setup() -> None:
    """Signals stop the child after removing the temporary folders it made (the parent's are the parent's to
    remove); it dies with its parent; torch runs one thread (its pool belongs to the parent: an OpenMP pool is not
    safe to use across fork)."""
    import shutil

    import torch

    from pit_export.models.checkpoint import PENDING

    inherited = set(PENDING)

    def stop(signum, frame):
        for d in PENDING - inherited:
            shutil.rmtree(d, ignore_errors=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    prctl = _libc_function("prctl")
    if prctl is not None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    torch.set_num_threads(1)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def _rebuild(name: str, message: str) -> Exception:
    from pit_export import errors
    from pit_export.models.checkpoint import CheckpointError, OutputError

    known = {
        c.__name__: c for c in (errors.BadInput, errors.GateFailed, errors.Unavailable, CheckpointError, OutputError)
    }
    if name in known:
        return known[name](message)
    return RuntimeError(f"{name}: {message}")

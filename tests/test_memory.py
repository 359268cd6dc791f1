"""run_forked: the work happens in a child whose heap dies with it; files and failures come back.
release_file_pages: a memory-mapped checkpoint gives back the pages of tensors nobody reads any more."""

import os
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pit_export.errors import BadInput
from pit_export.memory import release_file_pages, run_forked

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork isolation is Linux-only")


def test_results_come_back_through_files_and_the_heap_stays_in_the_child(tmp_path):
    seen = []

    def work():
        seen.append(os.getpid())
        (tmp_path / "out").write_text(str(os.getpid()))

    run_forked(work)
    assert seen == [] and int((tmp_path / "out").read_text()) != os.getpid()


def test_child_allocation_is_not_the_parents():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    n = 256 * 2**20

    def work():
        np.ones(n, np.uint8)  # touched, so resident in the child

    run_forked(work)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < n // 2 // 1024
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss >= n // 1024


def test_our_errors_keep_their_type_and_message():
    def work():
        raise BadInput("bad thing in the child")

    with pytest.raises(BadInput, match="^bad thing in the child$"):
        run_forked(work)


def test_other_errors_are_named():
    def work():
        raise KeyError("missing")

    with pytest.raises(RuntimeError, match="KeyError"):
        run_forked(work)


def test_a_killed_child_is_reported():
    def work():
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(RuntimeError, match="signal 9"):
        run_forked(work)


def test_a_terminated_child_removes_only_its_own_temporary_folders(tmp_path):
    from pit_export.models.checkpoint import scratch_dir

    with scratch_dir() as parents:

        def work():
            with scratch_dir() as mine:
                (tmp_path / "mine").write_text(str(mine))
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)  # the handler exits first

        with pytest.raises(RuntimeError, match="exit 143"):
            run_forked(work)
        assert parents.is_dir()
    assert not Path((tmp_path / "mine").read_text()).exists()


def _mapped_rss(path: Path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    rss, inside, target = 0, False, os.path.realpath(path)
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            inside = fields[-1] == target
        elif inside and fields[0] == "Rss:":
            rss += int(fields[1]) * 1024
    return rss


def test_released_pages_leave_the_mapping_and_live_tensors_keep_theirs(tmp_path):
    """Three tensors mapped from one safetensors file, all read (so resident): releasing the first two while a view
    of the second stays live gives back the first's whole pages and nothing of the view's; the live tensors keep
    their values, and the file's resident size drops by exactly what was given."""
    import torch
    from safetensors.torch import load_file, save_file

    n, page = 2**20, os.sysconf("SC_PAGE_SIZE")  # 4 MiB of float32 each
    gen = torch.Generator().manual_seed(0)
    src = {k: torch.randn(n, generator=gen) for k in ("a", "b", "c")}
    save_file(src, tmp_path / "w.safetensors")
    t = load_file(tmp_path / "w.safetensors")
    assert sum(v.sum().item() for v in t.values()) == pytest.approx(sum(v.sum().item() for v in src.values()))
    before = _mapped_rss(tmp_path / "w.safetensors")
    view = t["b"][n // 2 :]
    given = release_file_pages(tmp_path / "w.safetensors", [t["a"], t["b"]], [view, t["c"]])
    assert given % page == 0
    assert 6 * n - 4 * page <= given <= 6 * n  # a and half of b (4n + 2n bytes, inward to pages), not the view
    assert before - _mapped_rss(tmp_path / "w.safetensors") == given
    assert torch.equal(view, src["b"][n // 2 :]) and torch.equal(t["c"], src["c"])


def test_memory_not_mapped_from_the_file_is_left_alone(tmp_path):
    import torch

    anon = torch.ones(2**22)
    assert release_file_pages(tmp_path / "absent.safetensors", [anon], []) == 0
    assert anon.sum().item() == 2**22


def test_an_export_gives_back_the_checkpoint_pages_and_the_model_reads_them_again(tmp_path):
    """After an export the checkpoint's mapping holds no resident page (fold's reads go back once folded, the folded
    weights' shared ones when the backend releases them), and the model, run afterwards (validation's reference),
    reads the same weights from the file."""
    import torch
    from pit_export.models.checkpoint import WEIGHTS, load_checkpoint
    from safetensors.torch import load_file

    from pit_export.export import export_artifact

    from .conftest import DEFAULT_MODEL

    ckpt = load_checkpoint(DEFAULT_MODEL)
    weights = ckpt.path / WEIGHTS
    total = sum(v.float().sum().item() for v in ckpt.model.state_dict().values())  # every page read
    before = _mapped_rss(weights)  # this mapping, plus any other of the same file (other tests' checkpoints)
    assert before >= weights.stat().st_size // 2
    export_artifact(ckpt, "onnx-cpu", tmp_path / "o", "fp32")
    # whole pages inside each tensor go back; what may stay is the header's page and each tensor's two edge pages
    edges = 2 * len(ckpt.model.state_dict()) + 1
    assert before - _mapped_rss(weights) >= weights.stat().st_size - edges * os.sysconf("SC_PAGE_SIZE")
    stored = load_file(weights)
    assert all(torch.equal(v, stored[k]) for k, v in ckpt.model.state_dict().items() if k in stored)
    assert sum(v.float().sum().item() for v in ckpt.model.state_dict().values()) == total

"""run_forked: the work happens in a child whose heap dies with it; files and failures come back."""

import os
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pit_export.errors import BadInput
from pit_export.memory import run_forked

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

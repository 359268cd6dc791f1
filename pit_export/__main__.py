"""`pit-export` and `python -m pit_export`: signal handlers first, then the CLI.

The toolchain imports take seconds; an interrupt during them must end quietly too (nothing has been written yet)."""

import os
import signal
import sys


def _early_exit(signum, frame):
    sys.stderr.write(f"error: interrupted by signal {signum}; nothing was written\n")
    os._exit(128 + signum)


def _ignore_late_signals():
    # The outcome is decided. Python restores the default handlers while it tears down, so a signal landing then
    # would kill a finished run with -signum; ignore it instead, so the exit code stays the one the run earned.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def main():
    signal.signal(signal.SIGINT, _early_exit)
    signal.signal(signal.SIGTERM, _early_exit)
    from pit_export.cli import main as cli_main  # installs the handlers that clean up partial output

    try:
        cli_main()
    finally:
        _ignore_late_signals()


if __name__ == "__main__":
    main()

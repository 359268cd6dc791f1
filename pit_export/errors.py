"""One exception per exit code, under one base class; the CLI turns them into a one-line message and the code.

A leaf module: everything else imports it, it imports nothing of the package."""


class PitError(Exception):
    """Base of every error pit-export reports as one line; exit_code is the process's exit status."""

    exit_code = 1


class BadInput(PitError, ValueError):
    """Unreadable or invalid input: checkpoint, artifact, config, flag values."""

    exit_code = 2


class CheckpointError(BadInput):
    """A checkpoint (or an artifact's config) that cannot be used. The message is one line, fit for a CLI."""


class GateFailed(PitError):
    """A validation gate failed: the artifact does not match the training graph closely enough."""

    exit_code = 3


class Unavailable(PitError):
    """The target cannot run here (no adb device, macOS-only step, missing runtime)."""

    exit_code = 4


class OutputError(PitError, OSError):
    """The output location cannot take the result: it exists (and force is off), holds files pit-export did not write,
    is or holds an input, is not a folder, is not writable, or the disk filled up. Nothing was written."""

    exit_code = 5

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


def interrupted(signum: int) -> str:
    """The one line an interrupt leaves (SIGINT exits 130, SIGTERM 143)."""
    return f"interrupted by signal {signum}; no partial output is left"


# 1 is left for internal errors (a bug: please report it with --debug's traceback)
EXIT_OK, EXIT_BAD_INPUT, EXIT_GATE, EXIT_UNAVAILABLE, EXIT_OUTPUT = 0, 2, 3, 4, 5
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


def exit_code(e: BaseException) -> int:
    return e.exit_code if isinstance(e, PitError) else 1

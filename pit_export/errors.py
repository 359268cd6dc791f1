"""One exception per exit code; the CLI turns them into a one-line message and the code."""

from pit_export.models.checkpoint import CheckpointError, OutputError


class PitError(Exception):
    exit_code = 1


class BadInput(PitError):
    """Unreadable or invalid input: checkpoint, artifact, flag values."""

    exit_code = 2


class GateFailed(PitError):
    """A validation gate failed: the artifact does not match the training graph closely enough."""

    exit_code = 3


class Unavailable(PitError):
    """The target cannot run here (no adb device, macOS-only step, missing runtime)."""

    exit_code = 4


def interrupted(signum: int) -> str:
    """The one line an interrupt leaves (SIGINT exits 130, SIGTERM 143)."""
    return f"interrupted by signal {signum}; no partial output is left"


# 1 is left for internal errors (a bug: please report it with --debug's traceback)
EXIT_OK, EXIT_BAD_INPUT, EXIT_GATE, EXIT_UNAVAILABLE, EXIT_OUTPUT = 0, 2, 3, 4, 5
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
BAD_INPUT_ERRORS = (BadInput, CheckpointError)


def exit_code(e: BaseException) -> int:
    if isinstance(e, PitError):
        return e.exit_code
    if isinstance(e, OutputError):
        return EXIT_OUTPUT
    if isinstance(e, CheckpointError):
        return EXIT_BAD_INPUT
    return 1

"""One exception per exit code; the CLI turns them into a one-line message and the code."""

from pit_export.models.checkpoint import CheckpointError


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


EXIT_OK, EXIT_BAD_INPUT, EXIT_GATE, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 0, 2, 3, 4, 130
BAD_INPUT_ERRORS = (BadInput, CheckpointError)

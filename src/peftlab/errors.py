"""User-facing errors: a single line, shown by the CLI with exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: config, file, data or command line.

    The message is one line that names the field or file and says how to fix it.
    Only the CLI turns it into output and an exit code.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class ResourceError(UserError):
    """The machine ran out of something (memory, disk); the message carries advice."""


class TrainingDiverged(Exception):
    """A non-finite loss or gradient norm was seen at a given optimizer step."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"non-finite {what} at optimizer step {step}")
        self.step = step
        self.what = what

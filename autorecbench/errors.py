"""The package's exception classes. ``UserError`` and its subclasses are the user's to fix: the CLI prints them
as one line and exits with code 2. ``RunFailed`` is a run that went wrong on its own (recorded as failed, exit
code 1); ``RunDiverged`` one whose training diverged (recorded as diverged, exit code 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

QUOTE_LIMIT = 200


def quoted(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``value`` quoted for an error message, cut to ``limit`` characters (a 10 MB line stays one short line)."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"… ({len(text):,} characters)"


class UserError(Exception):
    """A problem the user can fix (bad input, missing file, bad option). Never a bug."""


class DataFormatError(UserError):
    """A raw data file does not match its published format.

    The message always names the file, and the 1-based line when one row is at fault.
    """

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class MissingDataError(UserError):
    """The raw files of a dataset are not where the config says."""


class RunFailed(RuntimeError):
    """The run itself went wrong: recorded as a failed run."""


class RunDiverged(RunFailed):
    """Training diverged (a non-finite loss or prediction, an exploding loss, an evaluation worse than a constant
    prediction): the run stops there and is recorded with status ``diverged``, the stage, step and reason."""

    def __init__(self, stage: str, step: int, reason: str) -> None:
        self.stage, self.step, self.reason = stage, int(step), reason
        super().__init__(f"diverged in the {stage} stage at step {step}: {reason}")

    def record(self) -> dict[str, Any]:
        return {"stage": self.stage, "step": self.step, "reason": self.reason}

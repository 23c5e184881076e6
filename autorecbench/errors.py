"""The package's exception classes. ``UserError`` and its subclasses are the user's to fix: the CLI prints them
as one line and exits with code 2. ``RunFailed`` is a run that went wrong on its own (recorded as failed)."""

from __future__ import annotations

from pathlib import Path


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
    """The run itself went wrong (e.g. non-finite predictions): recorded as a failed run."""

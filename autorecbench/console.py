"""Terminal output: logging, the run progress bar, and one-line user errors."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from autorecbench.errors import QUOTE_LIMIT


def _console(stderr: bool) -> Console:
    console = Console(stderr=stderr)
    # Pipes and CI logs get wide lines instead of tables squeezed into 80 columns.
    return console if console.is_terminal else Console(stderr=stderr, width=220)


err_console = _console(stderr=True)
out_console = _console(stderr=False)
log = logging.getLogger("autorecbench")


def secondary_process() -> bool:
    """A torchrun process other than rank 0: it trains its shard and reports nothing (rank 0 reports)."""
    return os.environ.get("RANK", "0") != "0" and os.environ.get("WORLD_SIZE", "1") != "1"


def setup_logging(level: int = logging.INFO) -> None:
    if log.handlers:
        return
    if secondary_process():
        level = max(level, logging.WARNING)
    handler: logging.Handler
    if err_console.is_terminal:
        handler = RichHandler(console=err_console, show_path=False, show_time=True, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # CI logs and pipes: plain lines, no wrapping
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} interactions/s" if speed else "– interactions/s", style="cyan")


class RichProgress:
    """Progress bar with interactions/s and ETA, on stderr."""

    def __init__(self, description: str) -> None:
        self.description = description
        self._progress: Progress | None = None
        self._task = None

    def start(self, total: int) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=total)

    def update(self, done: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


class LogProgress:
    """For ``--quiet``: a log line at every 10% of the stream instead of a bar."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.total = 0
        self.next_mark = 0.1
        self.started = 0.0

    def start(self, total: int) -> None:
        self.total, self.next_mark, self.started = total, 0.1, time.perf_counter()

    def update(self, done: int) -> None:
        if self.total and done / self.total >= self.next_mark - 1e-12:
            rate = done / max(time.perf_counter() - self.started, 1e-9)
            log.info("%s: %d/%d (%.0f%%, %.0f interactions/s)", self.description, done, self.total,
                     100 * done / self.total, rate)
            while done / self.total >= self.next_mark - 1e-12:
                self.next_mark += 0.1

    def stop(self) -> None:
        pass


MESSAGE_LIMIT = 2000
# A quoted value (repr) longer than QUOTE_LIMIT characters inside a message (see ``errors.quoted``).
_LONG_QUOTE = re.compile(r"""(['"])((?:(?!\1).){%d})(?:(?!\1).)+\1""" % QUOTE_LIMIT, re.DOTALL)


def one_line(message: str) -> str:
    """An error message as one bounded line: line breaks become spaces, every quoted value is cut to
    ``QUOTE_LIMIT`` characters (whatever the message's author did), the whole to ``MESSAGE_LIMIT``."""
    text = _LONG_QUOTE.sub(lambda m: f"{m[1]}{m[2]}{m[1]}…", " ".join(message.split()))
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT] + "…"


def print_error(message: str) -> None:
    """One line on stderr; the caller exits with its code (2 for a user error)."""
    err_console.print(Text.assemble(("error: ", "bold red"), one_line(message)), highlight=False, soft_wrap=True)


def run_app(app: Callable[[], object]) -> None:
    """Run a command-line app: a user error is one line on stderr and exit code 2; Ctrl-C is exit code 130."""
    from autorecbench.errors import UserError

    try:
        app()
    except UserError as exc:
        if not secondary_process():
            print_error(str(exc))
        sys.exit(2)
    except KeyboardInterrupt:
        print_error("interrupted")
        sys.exit(130)

"""Progress bars and console output that suit where they go: live bars on a terminal, nothing in a log
or a pipe (rich's bars would leave a blank line each there), and lines that do not wrap at 80 columns."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import track as rich_track

T = TypeVar("T")
LOG_WIDTH = 200  # the width of output that goes to a file or a pipe: a summary line stays one line


def interactive() -> bool:
    """Whether standard output is a terminal (progress bars are drawn only there)."""
    return sys.stdout.isatty()


def track(sequence: Iterable[T], *, description: str, total: int | None = None) -> Iterator[T]:
    """rich's transient progress bar over ``sequence`` on a terminal; the plain sequence otherwise."""
    if not interactive():
        yield from sequence
        return
    yield from rich_track(sequence, description=description, total=total, transient=True)


def make_console(*, stderr: bool = False) -> Console:
    """A rich console: the terminal's width on a terminal, ``LOG_WIDTH`` columns for a file or a pipe."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=LOG_WIDTH)


def metric_text(value: float | None) -> str:
    """A metric as the console shows it: three decimals, or ``null`` when it is undefined."""
    return "null" if value is None else f"{value:.3f}"

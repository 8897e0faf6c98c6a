"""Progress bars on stderr for long reads, writes and verifications.

A bar appears only when all three hold: stderr is a terminal, the user did not ask for quiet
(``n2n --quiet``, or :func:`set_quiet` from Python), and the work is large (at least
:data:`THRESHOLD` bytes). Everything else (pipes, logs, test runners, small models) stays
silent, so scripted output never fills with control characters. Bars are transient: they vanish
when the work is done and leave the report alone.

Example:
    >>> with task("writing out.safetensors", total=3 << 30) as bar:
    ...     bar.advance(1 << 30)
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Optional

THRESHOLD = 256 * 1024 * 1024  # bytes of work below which no bar is shown

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Turn every progress bar off (True) or back on where a terminal allows it (False)."""
    global _quiet
    _quiet = bool(quiet)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced by something without isatty
        return False


def _console():
    from rich.console import Console

    # NO_COLOR (any non-empty value): rich alone would still write bold and italic
    plain = {"color_system": None} if os.environ.get("NO_COLOR") else {}
    return Console(stderr=True, **plain)


class Bar:
    """One task's progress. :meth:`advance` is cheap when no bar is shown (the usual case)."""

    def __init__(self, description: str, total: Optional[int], unit: str, size: Optional[int]):
        self.description = description
        self.total = total
        self.unit = unit
        self.done = 0
        # The bar may be shown once the work is known to be large: at once when its size is known,
        # otherwise (a stream of unknown length) when the work done so far reaches the threshold.
        self._allowed = not _quiet and _stderr_is_terminal()
        self._size = size if size is not None else total
        self._progress = None
        self._task = None
        if self._allowed and self._size is not None and self._size >= THRESHOLD:
            self._start()

    @property
    def shown(self) -> bool:
        return self._progress is not None

    def _start(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.markup import escape

        from .errors import printable

        if self.unit == "bytes":
            columns = [DownloadColumn(binary_units=True), TransferSpeedColumn()]
        else:
            columns = [MofNCompleteColumn(), TextColumn(self.unit)]
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), *columns, TimeRemainingColumn(),
            console=_console(), transient=True,
        )
        self._progress.start()
        # the description names files: control characters made visible, and no rich markup
        description = escape(printable(self.description))
        self._task = self._progress.add_task(description, total=self.total, completed=self.done)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done)
        elif self._allowed and self._size is None and self.done >= THRESHOLD:
            self._start()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@contextlib.contextmanager
def task(description: str, total: Optional[int], *, unit: str = "bytes", size: Optional[int] = None) -> Iterator[Bar]:
    """A progress bar for one piece of work, closed (and erased) when the block ends.

    Args:
        description: what is being done, e.g. ``"writing out.safetensors"``.
        total: units of work (bytes unless `unit` says otherwise); None when unknown.
        unit: ``"bytes"``, or a word for counted steps (e.g. ``"nodes"``).
        size: bytes the work moves, to judge whether it is large when `total` counts steps;
            defaults to `total`.

    Returns:
        A :class:`Bar`; call ``bar.advance(n)`` as work completes.
    """
    bar = Bar(description, total, unit, size)
    try:
        yield bar
    finally:
        bar.close()

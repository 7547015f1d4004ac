"""Progress of long work, for a person at a terminal and for a log file alike.

:class:`Progress` is the one reporter every long command uses (``rag ingest``, ``rag eval``,
``rag llm prepare``; a future ``rag reindex`` too). On a terminal it draws a rich progress bar;
anywhere else (a pipe, a file, ``make run > run.log``, a CI log) it writes one plain line to
stderr at least every ``interval`` seconds, even while a single step takes long, e.g.::

    ingest: started
    ingest: 120/400 files (30%) · 41.0 chunks/s · 2.9 files/s · elapsed 41s · ETA 1m36s · manual.pdf
    ingest: 400/400 files · 12015 chunks · 41.0 chunks/s · 2.9 files/s · done in 2m18s

A progress bar alone left a user with an empty log and no idea whether a job had hung: a bar
redraws in place, so rich leaves it out of anything that is not a terminal.

The reporter is thread-safe: the work may call :meth:`Progress.update` from any thread while a
daemon thread writes the periodic lines. It never raises from a report (a broken stderr must not
fail the work it describes).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self, TextIO

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``seconds`` as ``45s``, ``3m05s`` or ``1h02m`` (what a person reads in a log)."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """Reports one piece of work: ``done`` of ``total`` units, plus counters turned into rates.

    Use as a context manager; :meth:`update` records the state (it is cheap, call it per item).

    Args:
        label: What is being done (``ingest``, ``eval retrieval``); starts every plain line.
        total: Units to do, if known (``None``: no percentage and no ETA until :meth:`update`
            gives one).
        unit: Name of the units counted by ``done`` (``files``, ``questions``); ``None`` for a step
            that has no units (lines then say how long it has been running, and ``current``).
        usually: How long this usually takes (``"25-40 s"``), said in the first line.
        rates: Counters (keyword arguments of :meth:`update`) reported as a rate per second,
            e.g. ``("chunks",)`` gives ``41 chunks/s``.
        stream: Where the report goes (default: ``sys.stderr``, read when entering).
        interval: Longest gap between two plain lines, in seconds.
        tty: Draw a bar (``True``) or write lines (``False``); default: whether ``stream`` is a
            terminal.
        ticker: Write the periodic lines from a daemon thread (tests turn it off and call
            :meth:`tick` themselves).
        clock: Monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(
        self,
        label: str,
        *,
        total: int | None = None,
        unit: str | None = "items",
        usually: str | None = None,
        rates: Sequence[str] = (),
        stream: TextIO | None = None,
        interval: float = 5.0,
        tty: bool | None = None,
        ticker: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.label = label
        self.unit = unit
        self.usually = usually
        self.rates = tuple(rates)
        self.interval = interval
        self._stream = stream
        self._tty = tty
        self._ticker = ticker
        self._clock = clock
        self._lock = threading.Lock()
        self._done = 0
        self._total = total
        self._current = ""
        self._counts: dict[str, int] = {}
        self._started = 0.0
        self._last_line = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None  # rich.progress.Progress on a terminal
        self._task: Any = None
        self._final_written = False

    # ------------------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(ok=exc_type is None)

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def is_tty(self) -> bool:
        """Whether this reporter draws a bar rather than writing lines."""
        if self._tty is None:
            try:
                self._tty = bool(self.stream.isatty())
            except (AttributeError, ValueError):
                self._tty = False
        return self._tty

    def start(self) -> None:
        """Start the clock, and the bar or the first line."""
        self._started = self._last_line = self._clock()
        if self.is_tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                ProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            counted: list[ProgressColumn] = [MofNCompleteColumn(), TextColumn("{task.fields[rates]}")]
            columns: list[ProgressColumn] = [
                TextColumn(f"[bold]{self.label}"),
                BarColumn(),
                *(counted if self.unit else []),
                TimeElapsedColumn() if self.unit is None else TimeRemainingColumn(),
                TextColumn(f"(usually {self.usually})" if self.usually else ""),
                TextColumn("{task.fields[current]}", style="dim"),
            ]
            self._bar = Bar(*columns, console=Console(file=self.stream), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self._total, rates="", current="")
            return
        about = [f"{self._total} {self.unit}"] if self._total is not None and self.unit else []
        if self.usually:
            about.append(f"usually {self.usually}")
        self._write(f"{self.label}: started" + (f" ({', '.join(about)})" if about else ""))
        if self._ticker:
            self._thread = threading.Thread(target=self._run_ticker, name=f"progress-{self.label}", daemon=True)
            self._thread.start()

    def close(self, *, ok: bool = True) -> None:
        """Stop the bar or the ticker and write the final line (``done`` or ``stopped``). Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        # Written on a terminal too: the bar is transient, and the line keeps how long it took.
        if self._started and not self._final_written:
            self._final_written = True
            self._write(self.final_line(ok=ok))

    # ------------------------------------------------------------------------------------------ reporting

    def update(
        self,
        done: int | None = None,
        *,
        total: int | None = None,
        advance: int = 0,
        current: str | None = None,
        **counts: int,
    ) -> None:
        """Record progress: ``done`` units (or ``advance`` more), the total if it changed, what is
        being worked on now, and increments of the named counters (``chunks=12``)."""
        with self._lock:
            if done is not None:
                self._done = done
            self._done += advance
            if total is not None:
                self._total = total
            if current is not None:
                self._current = current
            for name, n in counts.items():
                self._counts[name] = self._counts.get(name, 0) + n
        if self._bar is not None:
            self._bar.update(
                self._task, completed=self._done, total=self._total, rates=self._rates_text(), current=self._current
            )

    def echo(self, text: str) -> None:
        """Write a line of someone else's output (a child process's log) without breaking the bar."""
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
            return
        with contextlib.suppress(OSError, ValueError):
            print(text, file=self.stream, flush=True)

    def tick(self) -> None:
        """Write a plain line if ``interval`` seconds passed since the last one (the ticker calls this)."""
        if self._bar is not None or self._stop.is_set():
            return
        if self._clock() - self._last_line >= self.interval:
            self._write(self.line())

    def line(self) -> str:
        """The current state as one plain line."""
        with self._lock:
            done, total, current = self._done, self._total, self._current
        elapsed = self._clock() - self._started
        parts = [] if self.unit is None else [self._count(done, total, percent=True)]
        rates = self._rates_text()
        if rates:
            parts.append(rates)
        parts.append(f"elapsed {format_duration(elapsed)}")
        if total and 0 < done < total:
            parts.append(f"ETA {format_duration(elapsed / done * (total - done))}")
        if current:
            parts.append(current)
        return f"{self.label}: " + " · ".join(parts)

    def final_line(self, *, ok: bool = True) -> str:
        """The closing line: totals, rates and the whole duration."""
        with self._lock:
            done, total, counts = self._done, self._total, dict(self._counts)
        elapsed = self._clock() - self._started
        parts = [] if self.unit is None else [self._count(done, total, percent=False)]
        parts += [f"{counts.get(name, 0)} {name}" for name in self.rates]
        rates = self._rates_text()
        if rates:
            parts.append(rates)
        parts.append(f"{'done' if ok else 'stopped'} in {format_duration(elapsed)}")
        return f"{self.label}: " + " · ".join(parts)

    # ------------------------------------------------------------------------------------------ internals

    def _count(self, done: int, total: int | None, *, percent: bool) -> str:
        if not total:
            return f"{done} {self.unit}"
        return f"{done}/{total} {self.unit}" + (f" ({done / total:.0%})" if percent else "")

    def _rates_text(self) -> str:
        elapsed = self._clock() - self._started
        if elapsed <= 0:
            return ""
        with self._lock:
            values = [(name, self._counts.get(name, 0)) for name in self.rates]
            done = self._done
        shown = [f"{n / elapsed:.1f} {name}/s" for name, n in values]
        if self.rates and done and self.unit:
            shown.append(f"{done / elapsed:.1f} {self.unit}/s")
        return " · ".join(shown)

    def _run_ticker(self) -> None:
        # Wake often enough that a line is never more than a second late.
        while not self._stop.wait(min(1.0, self.interval / 2)):
            self.tick()

    def _write(self, text: str) -> None:
        self._last_line = self._clock()
        # A closed or broken stderr must not fail the work it describes.
        with contextlib.suppress(OSError, ValueError):
            print(text, file=self.stream, flush=True)

"""Progress on long work: a bar redrawn in place on a terminal, throttled lines in batch logs.

Only the ranks given ``speak = True`` report (group leads), each line tagged with its rank, so a
SLURM log says who is where. The bar counts finished units (members, steps) and shows the
detail of the unit in flight (the current block's sweep and residual) with an ETA.
"""
from __future__ import annotations

import sys
import time

from pipeline.console import tag


class Progress:
    """Report ``done`` of ``total`` units; ``detail`` says what the current unit is doing.

    On a terminal the line is redrawn at most every ``redraw`` s; otherwise a line is printed
    when a unit finishes and detail lines at most every ``every`` s."""

    def __init__(self, comm, total: int, unit: str, *, speak: bool | None = None,
                 stream=None, every: float = 30.0, redraw: float = 0.2, width: int = 24):
        self.comm, self.total, self.unit, self.width = comm, max(total, 0), unit, width
        self.speak = comm.rank == 0 if speak is None else speak
        self.stream = stream or sys.stderr
        self.live = self.speak and comm.rank == 0 and self.stream.isatty()
        self.every, self.redraw = every, redraw
        self.start = self._last = time.perf_counter()
        self.done, self.detail = 0, ""

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.start
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * round(frac * self.width) + "." * (self.width - round(frac * self.width))
        eta = f"eta {elapsed / self.done * (self.total - self.done):.0f}s" if self.done else "eta ?"
        detail = f" | {self.detail}" if self.detail else ""
        return (f"{tag(self.comm)}{self.unit} {self.done}/{self.total} [{bar}] {100 * frac:3.0f}%"
                f"{detail} | {elapsed:.0f}s, {eta}")

    def _emit(self, final: bool) -> None:
        if self.live:
            end = "\n" if final else ""
            print(f"\r\033[K{self._line()}", end=end, file=self.stream, flush=True)
        else:
            print(self._line(), file=self.stream, flush=True)
        self._last = time.perf_counter()

    def advance(self, count: int, detail: str = "") -> None:
        """``count`` more units finished; ``detail`` describes the last one."""
        self.done += count
        self.detail = detail
        if self.speak:
            self._emit(final=False)

    def note(self, detail: str) -> None:
        """What the unit in flight is doing (throttled)."""
        self.detail = detail
        if not self.speak:
            return
        wait = self.redraw if self.live else self.every
        if time.perf_counter() - self._last >= wait:
            self._emit(final=False)

    def close(self) -> None:
        """End the bar's line on a terminal."""
        if self.live:
            self._emit(final=True)

"""Progress on long work: a bar redrawn in place on a terminal, throttled lines in batch logs.

Only the ranks given ``speak = True`` report (group leads), each line tagged with its rank, so a
SLURM log says who is where. The bar counts finished units (members, steps) and shows the
detail of the unit in flight (the current block's sweep and residual) with an ETA, which counts
the part of the unit in flight already done, so it is known before the first unit ends, and
once more is done takes the pace since the first unit ended, leaving out the start's warm-up.
"""
from __future__ import annotations

import sys
import time

from pipeline.console import tag


# Seconds between a batch log's lines, and the group leads that may each print that often:
# more groups report as many lines in all, each group less often (``every_for``)
EVERY_S = 30.0
LOUD_GROUPS = 4


def every_for(groups: int) -> float:
    """The seconds between each of ``groups`` leads' log lines, so that a job of 64 groups
    writes no more lines a minute than one of 4."""
    return EVERY_S * max(1.0, groups / LOUD_GROUPS)


def clock(seconds: float) -> str:
    """A duration as a reader takes it in: "42s" below a minute, then "7:30" (minutes and
    seconds), then "13:03:20" (hours, minutes, seconds)."""
    whole = round(max(seconds, 0.0))
    if whole < 60:
        return f"{whole}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def stamp() -> str:
    """The local date and time to the second, "2026-12-07 19:30:12": what a batch log's line
    says of when it was written (a requeued job appends its runs to one log)."""
    return time.strftime("%Y-%m-%d %H:%M:%S")


class Progress:
    """Report ``done`` of ``total`` units; ``detail`` says what the current unit is doing.

    On a terminal the line is redrawn at most every ``redraw`` s. In a batch log a line is
    printed at most every ``every`` s, and always for the first and the last unit: a job of
    thousands of small batches must not write a line for each."""

    def __init__(self, comm, total: int, unit: str, *, speak: bool | None = None,
                 stream=None, every: float = EVERY_S, redraw: float = 0.2, width: int = 24):
        self.comm, self.total, self.unit, self.width = comm, max(total, 0), unit, width
        self.speak = comm.rank == 0 if speak is None else speak
        self.stream = stream or sys.stderr
        self.live = self.speak and comm.rank == 0 and self.stream.isatty()
        self.every, self.redraw = every, redraw
        self.start = self._last = time.perf_counter()
        self.done, self.detail, self.part = 0, "", 0.0
        self.own = 0  # of them, those this work finished (not found done by another job)
        self._first = True  # the first finished unit always prints: it shows the pace
        self._first_end = None  # (seconds, own units) when the first own unit finished

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.start
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * round(frac * self.width) + "." * (self.width - round(frac * self.width))
        own = self.own + self.part
        left = clock(self._left(elapsed, own)) if own > 0 else ""
        eta = (f"eta {self._bound(own) if left != '0s' else ''}{left}" if own > 0
               else "eta 0s" if self.done >= self.total else "eta ?")
        detail = f" | {self.detail}" if self.detail else ""
        return (f"{tag(self.comm)}{self.unit} {self.done}/{self.total} [{bar}] {100 * frac:3.0f}%"
                f"{detail} | {clock(elapsed)}, {eta}")

    def _bound(self, own: float) -> str:
        """"<" where the pace is still the start's, whose warm-up (a model's first calls, a
        device's tuning) makes the estimate high: an upper bound, not a forecast."""
        settled = self._first_end is not None and own > self._first_end[1]
        return "" if settled or self.done >= self.total else "<"

    def _left(self, elapsed: float, own: float) -> float:
        """Seconds left at this work's pace (``own`` units, the part in flight counted): since
        its first unit ended, once more is done (the first unit's time holds the start's
        warm-up: a model's first calls, a device's tuning); before then, so far."""
        left = self.total - self.done - self.part
        if self._first_end is not None and own > self._first_end[1]:
            at, then = self._first_end
            return (elapsed - at) / (own - then) * left
        return elapsed / own * left

    def _emit(self, final: bool) -> None:
        if self.live:
            end = "\n" if final else ""
            print(f"\r\033[K{self._line()}", end=end, file=self.stream, flush=True)
        else:  # one write, as console.print0 does: a stop between text and newline would
            # run the command's last line onto it; dated, as a batch log's lines are read later
            self.stream.write(f"{stamp()} {self._line()}\n")
            self.stream.flush()
        self._last = time.perf_counter()

    def advance(self, count: int, detail: str = "", own: bool = True) -> None:
        """``count`` more units finished; ``detail`` describes the last one; ``own``: by
        this work (False: found done by another job, which says nothing of the pace)."""
        self.done += count
        self.detail, self.part = detail, 0.0
        if own:
            self.own += count
            if self._first_end is None and count > 0:
                self._first_end = (time.perf_counter() - self.start, self.own)
        if not self.speak:
            return
        due = time.perf_counter() - self._last >= self.every
        if self.live or self._first or self.done >= self.total or due:
            self._emit(final=False)
            self._first = False

    def note(self, detail: str, part: float | None = None, now: bool = False) -> None:
        """What the unit in flight is doing (throttled, unless ``now``); ``part``: how much
        of it is done, in units (e.g. 0.5 of a batch of 4 members is 2)."""
        self.detail = detail
        if part is not None:
            self.part = max(0.0, part)
        if not self.speak:
            return
        wait = self.redraw if self.live else self.every
        if now or time.perf_counter() - self._last >= wait:
            self._emit(final=False)

    def close(self) -> None:
        """End the bar's line on a terminal."""
        if self.live:
            self._emit(final=True)

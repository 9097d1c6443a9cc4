"""Progress: redrawn in place on a terminal, whole tagged lines in batch logs (throttled, the
first and last unit always), an ETA that counts the unit in flight, silent on ranks that do
not speak, and the samplers' sweep hook (sequential ones: a block) feeds it."""
import io
import re

from pipeline.comm import SerialComm
from pipeline.grids import make_grid
from pipeline.noise import Noise
from pipeline.progress import Progress
from pipeline.samplers import SAMPLERS, Options
from models.grf import GaussianRandomField


class Tty(io.StringIO):
    def isatty(self):
        return True


class FakeComm(SerialComm):
    """Only the rank and size a progress line reads."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size


def test_terminal_bar_redraws_in_place():
    out = Tty()
    bar = Progress(SerialComm(), 4, "members", stream=out, redraw=0.0)
    bar.advance(2, "item 0")
    bar.note("sweep 3")
    bar.close()
    text = out.getvalue()
    assert text.count("\r\033[K") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "members 2/4 [############............]  50%" in text and "| sweep 3 |" in text


def test_log_lines_are_tagged_and_sweep_detail_throttled():
    out = io.StringIO()
    bar = Progress(FakeComm(2, 4), 8, "group 2/2 members", speak=True, stream=out, every=3600)
    for _ in range(5):
        bar.note("sweep")  # within the interval: no line
    bar.advance(4, "item 1")
    lines = out.getvalue().splitlines()
    # dated: a requeued job's runs share one log, read later
    assert len(lines) == 1 and re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[rank 2/4\] "
                                        "group 2/2 members 4/8", lines[0])
    assert "eta" in lines[0]


def test_ranks_that_do_not_speak_are_silent():
    out = io.StringIO()
    bar = Progress(FakeComm(1, 2), 2, "members", speak=False, stream=out, every=0)
    bar.note("x")
    bar.advance(2)
    bar.close()
    assert out.getvalue() == ""


def test_piadm_sampler_reports_every_sweep():
    model = GaussianRandomField((8, 8), slope=3.0, length=4.0)
    grid = make_grid("ou", 40, u_min=1e-3, u_max=10.0, block_size=20)
    noise = Noise(0, ((0, 0),), (8, 8))
    seen = []
    opts = Options(tol=0.1, max_sweeps=20, on_sweep=lambda *a: seen.append(a))
    _, stats = SAMPLERS["piadm-sde"](model, noise.prior(), grid, noise, comm=SerialComm(),
                                     options=opts)
    assert len(seen) == stats.rounds and {s[0] for s in seen} == {0, 20}
    assert [s[2] for s in seen] == list(stats.residuals)


def test_batch_log_prints_the_first_and_last_unit_not_every_one():
    out = io.StringIO()
    bar = Progress(SerialComm(), 100, "members", stream=out, every=3600)
    for i in range(100):
        bar.advance(1, f"item {i}")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "members 1/100" in lines[0] and "members 100/100" in lines[1]


def test_batch_log_prints_again_once_the_interval_passed():
    out = io.StringIO()
    bar = Progress(SerialComm(), 10, "members", stream=out, every=0.0)
    for _ in range(3):
        bar.advance(1)
    assert len(out.getvalue().splitlines()) == 3


def test_eta_counts_the_part_of_the_unit_in_flight():
    out = io.StringIO()
    bar = Progress(SerialComm(), 4, "members", stream=out, every=0.0)
    bar.note("step 50/100")
    assert "eta ?" in out.getvalue()  # nothing known yet
    bar.note("step 50/100", part=0.5)
    assert "eta ?" not in out.getvalue().splitlines()[-1]
    bar.advance(1)
    assert bar.part == 0.0  # a finished unit clears the part in flight


def test_sequential_sampler_reports_each_block():
    model = GaussianRandomField((8, 8), slope=3.0, length=4.0)
    grid = make_grid("ou", 40, u_min=1e-3, u_max=10.0, block_size=15)
    noise = Noise(0, ((0, 0),), (8, 8))
    seen = []
    opts = Options(on_sweep=lambda *a: seen.append(a))
    SAMPLERS["sequential-sde"](model, noise.prior(), grid, noise, comm=SerialComm(), options=opts)
    assert [s[0] for s in seen] == [15, 30, 40] and [s[1] for s in seen] == [15, 15, 10]


class Writes(io.StringIO):
    """A log that records each write call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def write(self, text):
        self.calls.append(text)
        return super().write(text)


def test_a_log_line_and_its_newline_are_one_write(monkeypatch):
    """A stop signal is taken between two writes: had a line and its newline gone out apart,
    the command's last line (what the stop kept) could run on after it."""
    import sys

    from pipeline.console import print0

    log = Writes()
    bar = Progress(SerialComm(), 2, "members", stream=log, every=0.0)
    bar.advance(1, "item 0")
    assert log.calls and all(call.endswith("\n") for call in log.calls)
    monkeypatch.setattr(sys, "stderr", Writes())
    print0(SerialComm(), "snapshots 6/4000 written")
    assert sys.stderr.calls == ["snapshots 6/4000 written\n"]


def test_eta_leaves_out_the_first_units_warm_up(monkeypatch):
    """The first batch holds the model's first calls: at its pace, a job of 10 batches whose
    first took 50 s and the next 10 s each was first said to need 450 s more, not 90."""
    from pipeline import progress

    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    out = io.StringIO()
    bar = Progress(SerialComm(), 10, "members", stream=out, every=0.0)
    now[0] = 50.0
    bar.advance(1)
    # nothing else known yet: the warm-up's pace, said as the bound it is
    assert out.getvalue().splitlines()[-1].endswith("50s, eta <7:30")
    now[0] = 60.0
    bar.advance(1)
    assert out.getvalue().splitlines()[-1].endswith("1:00, eta 1:20")
    now[0] = 65.0
    bar.note("step 50/100", part=0.5)
    assert out.getvalue().splitlines()[-1].endswith("1:05, eta 1:15")


def test_many_groups_each_report_less_often():
    """Each group's lead printed a line every 30 s: 64 groups wrote 64 lines every 30 s."""
    from pipeline.progress import EVERY_S, every_for

    assert every_for(1) == every_for(4) == EVERY_S == 30.0
    assert every_for(64) == 16 * EVERY_S  # 64 leads, as many lines a minute as 4


def test_units_another_job_finished_and_empty_advances_leave_the_pace_alone(monkeypatch):
    """Members found done by another job, counted at once, were the 'first unit' and kept the
    warm-up in the pace; a zero advance set it too."""
    from pipeline import progress

    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    out = io.StringIO()
    bar = Progress(SerialComm(), 10, "members", stream=out, every=0.0)
    bar.advance(4, "another job's", own=False)
    assert out.getvalue().splitlines()[-1].endswith("eta ?")  # nothing of this work's pace
    bar.advance(0)
    now[0] = 50.0
    bar.advance(1)  # the first own unit, with the warm-up: 50 s
    assert out.getvalue().splitlines()[-1].endswith("50s, eta <4:10")
    now[0] = 60.0
    bar.advance(1)  # then 10 s a unit, 4 left
    assert out.getvalue().splitlines()[-1].endswith("1:00, eta 40s")


def test_durations_read_as_seconds_minutes_and_hours():
    from pipeline.progress import clock

    assert [clock(t) for t in (0, 42.4, 59.6, 60, 450, 3599, 3600, 47000)] == [
        "0s", "42s", "1:00", "1:00", "7:30", "59:59", "1:00:00", "13:03:20"]


def test_evaluates_first_line_takes_its_pace_from_the_scorings_start(capsys):
    """The bar was made at the first item's end, so its clock had run for nothing: the
    first line of 10,000 items said "eta 0s"."""
    import time

    from pipeline.cli import _scoring_progress

    progress = _scoring_progress()
    progress(0, 10)  # the scoring starts
    time.sleep(0.2)  # 9 more at that pace: about 2 s
    progress(1, 10)
    line = capsys.readouterr().err.strip()
    assert "items scored 1/10" in line and "eta <" in line and "eta 0s" not in line

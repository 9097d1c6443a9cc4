"""Runs stopped from outside: SIGTERM gives a prompt clean exit that a rerun completes; kill -9
at any moment leaves a store that a rerun completes; concurrent jobs on distinct items of one
store lose nothing. Each compares with an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import conditional_sets, make_input
from pipeline.cli import main
from pipeline.signals import EXIT_PREEMPTED
from test_ensemble import assert_same_store

ROOT = Path(__file__).resolve().parents[1]
MORE_WORK = ("sampler.steps=200", "sampler.block_size=50", "ensemble.batch_size=1")


def start(sets, command="sample") -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", command, "jobs/configs/grf.toml",
                             *sets], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def members_done(path) -> int:
    try:
        return int(zarr.open_group(path, mode="r")["done"][:].sum())
    except Exception:  # not created yet
        return 0


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The input store and an uninterrupted run's store."""
    base = tmp_path_factory.mktemp("clean")
    inp = make_input(base / "input.zarr")
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(inp, base / "clean.zarr", *MORE_WORK)]) == 0
    return inp, base / "clean.zarr"


@pytest.mark.slow
def test_each_stop_signal_ends_promptly_and_the_reruns_complete(tmp_path, clean):
    """SIGTERM, SIGUSR1 (SLURM's warning before the time limit) and Ctrl-C, each to a run that
    resumes the one stopped before it: each ends promptly with what it finished kept, and the
    last rerun completes the store of the uninterrupted run."""
    inp, ref = clean
    out = tmp_path / "ens.zarr"
    sets = conditional_sets(inp, out, *MORE_WORK)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        before = members_done(out)
        proc = start(sets)
        deadline = time.monotonic() + 60
        while members_done(out) < before + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(sig)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == EXIT_PREEMPTED, err
        assert time.monotonic() - sent < 10 and f"received {sig.name}" in err, err
        assert "Traceback" not in err and before + 2 <= members_done(out) < 36
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
    assert_same_store(ref, out)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_a_rerun_gives_the_clean_store(tmp_path, clean):
    inp, ref = clean
    out = tmp_path / "ens.zarr"
    sets = conditional_sets(inp, out, *MORE_WORK)
    rng = np.random.default_rng()
    for _ in range(3):
        proc = start(sets)
        time.sleep(rng.uniform(0.5, 6.0))
        proc.kill()
        proc.communicate(timeout=30)
    assert main(["sample", "jobs/configs/grf.toml", *sets]) == 0
    assert_same_store(ref, out)


@pytest.mark.slow
def test_concurrent_jobs_on_distinct_items_lose_nothing(tmp_path, clean):
    inp, ref = clean
    out = tmp_path / "ens.zarr"
    procs = [start(conditional_sets(inp, out, *MORE_WORK, f"parallel.items={part}"))
             for part in ("[0, 2, 4]", "[1, 3, 5]")]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert members_done(out) == 36
    assert_same_store(ref, out)


@pytest.mark.slow
def test_two_identical_jobs_share_the_batches_and_write_each_member_once(tmp_path, clean):
    import json
    import re

    inp, ref = clean
    out = tmp_path / "ens.zarr"
    procs = [start(conditional_sets(inp, out, *MORE_WORK)) for _ in range(2)]
    said = []
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        said.append(err)
    # the job that ends last says the store is whole, the other's members included
    assert any("; the store holds 36 of 36)" in err for err in said), said
    assert_same_store(ref, out)
    history = json.loads(zarr.open_group(out, mode="r").attrs["piadm_history"])
    written = [int(m.group(1)) for line in history
               if (m := re.search(r"piadm wrote (\d+) members", line))]
    assert len(written) == 2 and sum(written) == 36  # each member written by one job only


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has installed a handler for ``sig`` (Linux /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines()
                      if line.startswith("SigCgt:")), 16)
    return bool(caught >> (sig - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_during_start_up_exits_75_with_nothing_written(tmp_path, sig):
    out = tmp_path / "ens.zarr"
    proc = start([f"--set=output.path={out}", "--set=ensemble.members=2"])
    deadline = time.monotonic() + 30
    while not _catches(proc.pid, sig) and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.send_signal(sig)  # the heavy imports are still to come
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "nothing was written" in err and not out.exists()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_during_another_commands_start_up_says_so_and_exits_128_plus_it(sig):
    # bench does not stop gracefully: the signal held through its imports stops it at once
    proc = start(["--set=bench.sizes=[[8, 8]]", "--set=sampler.steps=20"], command="bench")
    deadline = time.monotonic() + 30
    while not _catches(proc.pid, sig) and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.send_signal(sig)  # the heavy imports are still to come
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert err.strip().splitlines()[-1] == f"piadm: stopped by {signal.Signals(sig).name}", err


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("command", ["sample", "bench"])
def test_a_ctrl_c_during_the_imports_is_one_line_not_a_traceback(tmp_path, command):
    """Python's KeyboardInterrupt in the imports before a command begins printed a traceback
    of the module it landed in."""
    proc = start([f"--set=output.path={tmp_path / 'ens.zarr'}", "--set=bench.sizes=[[8, 8]]"],
                 command=command)
    deadline = time.monotonic() + 30
    while not _catches(proc.pid, signal.SIGTERM) and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)  # the heavy imports are still to come
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] in (
        "piadm: interrupted (Ctrl-C) before the command began: nothing was done",
        "piadm: interrupted (Ctrl-C)"), err  # the second where it landed past the imports
    assert not (tmp_path / "ens.zarr").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_after_the_run_finished_does_not_fail_the_job(tmp_path, sig):
    """SLURM's SIGTERM (or a late Ctrl-C) may land while the interpreter shuts down after a
    finished run, which puts the default handling back: the exit status stays 0, not 143 or
    130."""
    proc = start(["--set", f"output.path={tmp_path / 'e.zarr'}", "--set", "model.shape=[8, 8]",
                  "--set", "sampler.steps=20", "--set", "ensemble.members=2"])
    for line in proc.stderr:  # the summary's last line: the work is over
        if "open with" in line:
            break
    time.sleep(0.05)  # into the shutdown
    proc.send_signal(sig)
    proc.stderr.read()
    assert proc.wait(timeout=60) == 0


PENDING_IO = """
import asyncio, sys
import zarr.core.sync
from pipeline.signals import settle_zarr_io

async def write():  # a write of two chunks, as Zarr runs it, that the stop cut short
    async def chunk():
        await asyncio.sleep(0.3)
    for one in asyncio.as_completed([chunk(), chunk()]):
        await one

cut_short = asyncio.run_coroutine_threadsafe(write(), zarr.core.sync._get_loop())
if sys.argv[1] == "settle":
    settle_zarr_io()
    assert cut_short.done()
"""


@pytest.mark.parametrize("settle", [True, False])
def test_zarr_io_a_stop_cut_short_finishes_before_the_exit_instead_of_printing_a_traceback(
        settle):
    proc = subprocess.run([sys.executable, "-c", PENDING_IO, "settle" if settle else "exit"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    # without settling, Python reports the destroyed task (the same race gave the traceback)
    assert (proc.stderr == "") == settle, proc.stderr


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_process_that_ended_and_awaits_reaping_is_not_alive():
    """A rank MPI_Abort killed stays a zombie until its launcher collects it: status right
    after the abort called the dead job live ("wait for them")."""
    from pipeline.processes import process_alive

    child = subprocess.Popen(["sleep", "0"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not process_alive(child.pid)  # ended, not yet reaped
    child.wait()


def test_a_second_signal_arriving_while_the_first_is_said_is_not_said_again(monkeypatch):
    """Under `timeout`, which delivers SIGTERM twice, a rank printed its "received" line
    twice: the flag was set only after the line was written."""
    from pipeline import signals

    stop, said = signals.StopRequest(), []

    def say(text):  # the second signal lands while the first one's line is written
        said.append(text)
        if len(said) == 1:
            stop._handle(signal.SIGTERM, None)

    monkeypatch.setattr(signals, "say", say)
    stop._handle(signal.SIGTERM, None)
    assert len(said) == 1 and stop.signal == signal.SIGTERM

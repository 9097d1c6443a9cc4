"""Claims and locks that jobs sharing one store use: a live job's claim is respected, a dead
job's is taken over by one taker, and the lock makes read-modify-write updates of shared
metadata (the store's history) lose nothing when jobs finish together."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipeline.claims import Heartbeat, claim, holding


def test_a_live_jobs_claim_is_respected_and_its_owner_keeps_it(tmp_path):
    beats = [Heartbeat(tmp_path, job).start() for job in ("a", "b")]
    try:
        assert claim(tmp_path, "0-0", "a")
        assert not claim(tmp_path, "0-0", "b")
        assert claim(tmp_path, "0-0", "a")  # a requeued job keeps its own claims
        assert claim(tmp_path, "0-4", "b")
    finally:
        for beat in beats:
            beat.stop()


def test_a_job_waiting_for_another_jobs_batch_says_for_whom(tmp_path, monkeypatch):
    """A batch another live job holds is waited for till that job finishes it or its
    heartbeat stops for STALE_S: a rerun beside a node that died sat a minute in silence.
    The line named the waiting job itself among the holders."""
    import io
    from types import SimpleNamespace

    from pipeline import claimed
    from pipeline.claims import batch_key, claims_dir
    from pipeline.comm import SerialComm
    from pipeline.progress import Progress
    from pipeline.work import PAUSE

    store = tmp_path / "s.zarr"
    folder = claims_dir(store)
    folder.mkdir()
    beat = Heartbeat(folder, "slurm-9.0").start()
    own = Heartbeat(folder, "slurm-10.0").start()  # the waiting job's own: not named
    try:
        assert claim(folder, batch_key(0, 0), "slurm-9.0")
        monkeypatch.setattr(claimed, "members_left", lambda path, item, members: members)
        said = io.StringIO()
        bar = Progress(SerialComm(), 2, "members", stream=said)
        calls = claimed._claims([(0, (0, 1), (0, 1))], SerialComm(), None, None, bar,
                                SimpleNamespace(dim="time", labels=[0]), store, "slurm-10.0")
        assert next(calls) is PAUSE and next(calls) is PAUSE  # looked again: still held
        assert said.getvalue().count("waiting for 1 batch that slurm-9.0 holds (taken over if "
                                     "its heartbeat stops for 60 s)") == 1
    finally:
        beat.stop()
        own.stop()


def test_a_dead_jobs_claim_goes_to_exactly_one_taker(tmp_path):
    (tmp_path / "0-0.json").write_text(json.dumps({"job": "gone", "time": 0.0}))
    beats = [Heartbeat(tmp_path, job).start() for job in ("a", "b")]
    try:
        won = [claim(tmp_path, "0-0", job) for job in ("a", "b")]
        assert won == [True, False]
        assert json.loads((tmp_path / "0-0.json").read_text())["job"] == "a"
    finally:
        for beat in beats:
            beat.stop()


def test_the_lock_makes_concurrent_updates_lose_nothing(tmp_path):
    counter = tmp_path / "count.json"
    counter.write_text("0")
    jobs, rounds = 4, 5

    def update(job):
        beat = Heartbeat(tmp_path, job).start()
        try:
            for _ in range(rounds):
                with holding(tmp_path, "finalize", job):
                    seen = int(counter.read_text())
                    time.sleep(0.01)  # without the lock the others read the same value here
                    counter.write_text(str(seen + 1))
        finally:
            beat.stop()

    threads = [threading.Thread(target=update, args=(f"job{j}",)) for j in range(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert int(counter.read_text()) == jobs * rounds
    assert not (tmp_path / "finalize.json").exists()  # given back


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    (tmp_path / "finalize.json").write_text(json.dumps({"job": "gone", "time": 0.0}))
    beat = Heartbeat(tmp_path, "me").start()
    try:
        done = threading.Event()

        def run():
            with holding(tmp_path, "finalize", "me"):
                done.set()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert done.wait(10)
    finally:
        beat.stop()


def _age(path, seconds):
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_claims_go_back_and_forth_between_requeued_jobs_that_keep_their_ids(tmp_path):
    # slurm-1 claims, dies; slurm-2 takes over, dies; slurm-1 (requeued) takes over, dies; ...
    # no job holds a heartbeat here, so each owner in turn is dead to the next
    assert claim(tmp_path, "0-0", "slurm-1")
    for job in ("slurm-2", "slurm-1", "slurm-2", "slurm-1"):
        assert claim(tmp_path, "0-0", job)
        assert json.loads((tmp_path / "0-0.json").read_text())["job"] == job
    assert not list(tmp_path.glob("*.takeover"))  # every takeover gave its lock back


def test_a_claim_left_empty_by_a_kill_is_taken_over_once_it_is_old(tmp_path):
    empty = tmp_path / "0-4.json"
    empty.write_text("")  # created, then killed before writing
    assert not claim(tmp_path, "0-4", "a")  # it may be being written this instant
    _age(empty, 60)
    assert claim(tmp_path, "0-4", "a")
    assert json.loads(empty.read_text())["job"] == "a"


def test_a_takeover_lock_left_by_a_killed_taker_is_cleared_once_it_is_old(tmp_path):
    (tmp_path / "0-0.json").write_text(json.dumps({"job": "gone", "time": 0.0}))
    lock = tmp_path / "0-0.takeover"
    lock.write_text("")
    assert not claim(tmp_path, "0-0", "a")  # another taker may hold it now
    _age(lock, 60)
    assert not claim(tmp_path, "0-0", "a")  # this look clears it ...
    assert claim(tmp_path, "0-0", "a")  # ... and the next takes the claim over


def test_slurm_job_ids_keep_the_job_and_its_step(monkeypatch):
    from pipeline.claims import new_job_id

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert new_job_id() == "slurm-4242" == new_job_id()  # a requeued job is the same job
    monkeypatch.setenv("SLURM_STEP_ID", "1")
    assert new_job_id() == "slurm-4242.1"  # two steps side by side are two jobs
    monkeypatch.setenv("SLURM_PROCID", "3")  # srun --mpi=none -n 4: four commands
    assert new_job_id() == "slurm-4242.1.p3"
    assert new_job_id(unique=True).startswith(socket.gethostname())  # a store's replacer


def test_a_second_command_of_one_slurm_step_gets_an_id_of_its_own(tmp_path, monkeypatch):
    """Two piadm commands started in one batch script share the job and step: the second
    must not take the first's claims and locks for its own, nor stop its heartbeat."""
    from pipeline.claims import new_job_id

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    for name in ("SLURM_STEP_ID", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        beat = tmp_path / "job-slurm-4242.alive"  # the first command's, beating
        beat.write_text(json.dumps({"host": socket.gethostname(), "pid": first.pid}))
        second = new_job_id(tmp_path)
        assert second.startswith("slurm-4242-") and second != new_job_id(tmp_path)
    finally:
        first.kill()
        first.wait()
    assert new_job_id(tmp_path) == "slurm-4242"  # its process gone: a requeue is that job
    beat.unlink()
    assert new_job_id(tmp_path) == "slurm-4242" and beat.exists()  # taken: created
    assert new_job_id(tmp_path).startswith("slurm-4242-")  # a second command at that instant
    _age(beat, 60)
    assert new_job_id(tmp_path) == "slurm-4242"  # created by a run killed at once, long ago


def test_a_heartbeat_is_never_read_half_written(tmp_path):
    """Rewritten in place, a heartbeat file is empty for an instant, and a live job read then
    looks dead (its claims taken over, its store replaced under it)."""
    from pipeline.claims import live_jobs

    beat = Heartbeat(tmp_path, "busy").start()
    stop, misses, looks = threading.Event(), [0], [0]

    def watch():
        while not stop.is_set():
            looks[0] += 1
            try:
                whole = json.loads(beat.path.read_text())["pid"] == os.getpid()
            except (OSError, ValueError):
                whole = False
            misses[0] += not whole or live_jobs(tmp_path) != ["busy"]

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(2000):
            beat._beat()
    finally:
        stop.set()
        watcher.join()
        beat.stop()
    assert looks[0] > 50 and misses[0] == 0


def test_a_lock_taken_over_meanwhile_is_not_given_back_by_its_former_holder(tmp_path):
    from pipeline.claims import holds

    with holding(tmp_path, "finalize", "slow"):
        # "slow" looked dead to another job, which took the lock over
        (tmp_path / "finalize.json").write_text(json.dumps({"job": "other", "time": 0.0}))
    assert holds(tmp_path, "finalize", "other")


def test_a_lock_is_given_back_only_between_takeovers(tmp_path):
    """Giving a lock back looks whose it is and removes it under the takeover lock: a taker
    that replaces the lock between that look and the removal keeps what it took."""
    from pipeline.claims import holds

    taking = tmp_path / "finalize.takeover"
    inside, leave = threading.Event(), threading.Event()

    def slow_job():
        with holding(tmp_path, "finalize", "slow"):
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=slow_job, daemon=True)
    thread.start()
    assert inside.wait(10)
    taking.write_text("")  # another job, taking the lock over from "slow", holds this now
    leave.set()
    time.sleep(0.3)
    assert thread.is_alive()  # giving back waits for the takeover
    (tmp_path / "finalize.json").write_text(json.dumps({"job": "other", "time": 0.0}))
    taking.unlink()
    thread.join(10)
    assert not thread.is_alive()
    assert holds(tmp_path, "finalize", "other") and not taking.exists()


def test_a_claim_a_full_disk_cuts_short_names_its_file_and_leaves_none(tmp_path, monkeypatch):
    import errno

    class Full:
        def __init__(self, fd, mode):
            os.close(fd)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pipeline.claims.os.fdopen", Full)
    with pytest.raises(OSError) as info:
        claim(tmp_path, "0-0", "a")
    assert info.value.filename == str(tmp_path / "0-0.json")
    assert not (tmp_path / "0-0.json").exists()  # no empty claim left for others to age out


def test_a_finished_stores_claims_go_and_its_folder_with_them(tmp_path):
    from pipeline.claims import claims_dir, clear_batch_claims
    from pipeline.cli import main

    out = tmp_path / "g.zarr"
    assert main(["sample", "jobs/configs/grf.toml", "--set", "model.shape=[8, 8]",
                 "--set", "sampler.steps=20", "--set", "ensemble.members=4",
                 "--set", "ensemble.batch_size=2", "--set", f"output.path={out}"]) == 0
    assert not claims_dir(out).exists()  # every batch claim and the heartbeat gone
    folder = tmp_path / "f.claims"
    folder.mkdir()
    for name in ("0-0.json", "12-4.json", "finalize.json", "job-1.alive", "0-0.takeover"):
        (folder / name).write_text("{}")
    assert clear_batch_claims(folder) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["0-0.takeover", "finalize.json",
                                                         "job-1.alive"]
    # a job killed part way (its heartbeat never stopped) leaves no folder behind once a
    # later run finishes the store
    half = tmp_path / "h.zarr"
    sets = ["--set", "model.shape=[8, 8]", "--set", "sampler.steps=20", "--set",
            "ensemble.batch_size=2", "--set", f"output.path={half}"]
    assert main(["sample", "jobs/configs/grf.toml", *sets, "--set", "ensemble.members=2"]) == 0
    claims_dir(half).mkdir()
    dead = claims_dir(half) / "job-slurm-7.alive"  # a process of this host that is gone
    dead.write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 7}))
    # and the lock a killed replacer held, and a heartbeat it was writing on a full disk
    (claims_dir(half) / "replace.json").write_text(json.dumps({"job": "slurm-7", "time": 0}))
    aside = claims_dir(half) / "job-slurm-7.alive.123.tmp"
    aside.write_text("")
    os.utime(aside, (time.time() - 3600, time.time() - 3600))
    assert main(["sample", "jobs/configs/grf.toml", *sets, "--set", "ensemble.members=4"]) == 0
    assert not claims_dir(half).exists()


def test_a_claims_folder_removed_by_another_job_is_made_again(tmp_path, monkeypatch):
    """Heartbeat.stop removes an empty claims folder: a job starting that instant, between
    making the folder and writing into it, makes it again rather than fail."""
    import pathlib

    folder = tmp_path / "s.zarr.claims"
    real = pathlib.Path.mkdir
    removed = []

    def mkdir_then_lost(self, *args, **kwargs):  # another job's stop() right after it
        real(self, *args, **kwargs)
        if self == folder and not removed:
            removed.append(True)
            self.rmdir()

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir_then_lost)
    beat = Heartbeat(folder, "b").start()
    try:
        assert removed and any(folder.glob("job-b.alive"))
        removed.clear()
        for name in list(folder.iterdir()):
            name.unlink()
        folder.rmdir()
        assert claim(folder, "0-0", "b") and (folder / "0-0.json").exists()
    finally:
        beat.stop()


def test_a_heartbeat_that_meets_a_full_disk_names_its_file(tmp_path, monkeypatch):
    """A write on a full disk raises an OSError that names no file: the run's one line said
    "cannot use: No space left on device" and nothing of where."""
    import errno
    from pathlib import Path

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as info:
        Heartbeat(tmp_path, "x").start()
    assert info.value.filename == str(tmp_path / "job-x.alive")


def test_a_claim_the_disk_refuses_is_a_one_line_error_that_says_what_is_kept(tmp_path,
                                                                           monkeypatch, capsys):
    """A full disk met first by a batch's claim file was 'cannot use ...: No space left'
    from the lead rank alone (and MPI's abort on several ranks), not what the store kept."""
    import errno

    import pipeline.claimed
    from pipeline.cli import main

    real, calls = pipeline.claimed.claim, [0]

    def full_after_one(folder, key, job):
        calls[0] += 1
        if calls[0] > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / f"{key}.json"))
        return real(folder, key, job)

    monkeypatch.setattr(pipeline.claimed, "claim", full_after_one)
    out = tmp_path / "c.zarr"
    assert main(["sample", "jobs/configs/grf.toml", "--set", f"output.path={json.dumps(str(out))}",
                 "--set", "model.shape=[8, 8]", "--set", "sampler.steps=10", "--set",
                 "sampler.method=sequential-sde", "--set", "ensemble.members=4", "--set",
                 "ensemble.batch_size=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"piadm: error: claiming a batch of {out} failed: No space left on "
                          f"device ({out}.claims/0-2.json); the members written before it are "
                          "kept")
    import zarr

    assert int(zarr.open_group(out, mode="r")["done"][:].sum()) == 2


def test_a_store_replaced_under_a_claim_keeps_its_own_refusal(tmp_path, monkeypatch):
    """The claim's failure handling took the store's own StoreExists (another run replaced
    it) for a full disk: 'claiming a batch failed: ... (None); free space', a WriteFailed."""
    import pipeline.claimed
    from pipeline.api import load_config, sample
    from pipeline.store import StoreExists

    def replaced(path, *args):
        raise StoreExists(f"output {path} was replaced or deleted by another run")

    monkeypatch.setattr(pipeline.claimed, "_claim_state", replaced)
    cfg = load_config("jobs/configs/grf.toml", {
        "output.path": str(tmp_path / "r.zarr"), "model.shape": [8, 8], "sampler.steps": 10,
        "sampler.method": "sequential-sde", "ensemble.members": 2})
    with pytest.raises(StoreExists, match=r"^output .*r.zarr was replaced or deleted by another "
                                          r"run$"):
        sample(cfg)


@pytest.mark.parametrize("background", [True, False])
def test_a_batchs_claim_is_given_back_once_it_is_written(tmp_path, background):
    """The claims of finished batches stayed until the whole store was done: a file a batch
    (100,000 on a store of 100,000 batches, stopped part way) in the folder every job lists
    to find the live ones. Each goes once its batch is written and marked done."""
    import zarr

    from pipeline import api
    from pipeline.claims import claims_dir

    store = tmp_path / "d.zarr"
    tree = {"model": {"shape": [8, 8]}, "sampler": {"steps": 6, "block_size": 3},
            "ensemble": {"members": 8, "batch_size": 1},
            "output": {"path": str(store), "background": background}}

    def after_three():
        return store.exists() and int(zarr.open_group(store, mode="r")["done"][:].sum()) >= 3

    stopped = api.sample(tree, stop=after_three)
    assert stopped.preempted and 3 <= stopped.members < 8
    done = zarr.open_group(store, mode="r")["done"][0]
    held = [int(p.stem.split("-")[1]) for p in claims_dir(store).glob("*-*.json")]
    # at most the batch claimed for the call the stop came before, not written
    assert len(held) <= 1 and not any(done[m] for m in held)


def test_clearing_what_dead_jobs_left_removes_only_what_piadm_makes(tmp_path):
    """A *.json without a live "job" read as a dead job's lock: a store's zarr.json went."""
    from pipeline.claims import clear_left_by_dead, ours

    (tmp_path / "zarr.json").write_text('{"zarr_format": 3}')
    (tmp_path / "finalize.json").write_text('{"job": "gone"}')  # a dead job's lock
    (tmp_path / "notes.tmp").write_text("")
    os.utime(tmp_path / "notes.tmp", (0, 0))  # old, as a dead job's draft would be
    assert clear_left_by_dead(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp", "zarr.json"]
    assert [ours(n) for n in ("job-slurm-9.0.alive", "3-0.json", "replace.takeover",
                              "3-0.slurm-9.0.tmp", "job-a.alive.12.tmp",
                              "3-0.slurm-9.0.takeover")] == [True] * 6  # (an older piadm's)

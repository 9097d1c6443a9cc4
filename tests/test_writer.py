"""The background writer (``pipeline.writer``)."""
import pytest


def test_a_writer_thread_that_cannot_start_is_a_one_line_error(monkeypatch):
    """Under a low ``ulimit -v`` starting the writer's thread raised RuntimeError "can't
    start new thread", a traceback; the fix (output.background = false) went unsaid."""
    import threading

    from pipeline.errors import OutOfMemory
    from pipeline.writer import BackgroundWriter

    def no_room(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_room)
    with pytest.raises(OutOfMemory, match=r"raise it or set output.background = false"):
        BackgroundWriter().start()


def test_any_other_thread_that_cannot_start_is_one_line_naming_the_limit():
    """zarr's pool or torch's threads under a low ulimit -v: a traceback (the heartbeat's
    and the writer's say their own)."""
    from pipeline.errors import FailedElsewhere, OutOfMemory, as_user_error

    err = as_user_error(RuntimeError("can't start new thread"), "sample")
    assert isinstance(err, OutOfMemory) and str(err) == (
        "sample: a thread could not start (can't start new thread): a limit on the address "
        "space (ulimit -v: no room for its stack) or on processes and threads (ulimit -u, a "
        "container's or job's pids limit) was met; raise it")
    # the other ranks' word for rank 0's: not theirs to say as their own
    elsewhere = FailedElsewhere("rank 0 failed: RuntimeError: can't start new thread")
    assert as_user_error(elsewhere, "sample") is elsewhere


def test_a_heartbeat_that_cannot_start_closes_the_writer_and_leaves_no_claims(tmp_path,
                                                                             monkeypatch):
    """The writer, started before it, was left running, and the claims folder behind."""
    import threading

    from pipeline import api
    from pipeline.config import load_config
    from pipeline.errors import OutOfMemory

    start, alive = threading.Thread.start, []

    def no_beat(thread):
        if thread.name == "piadm-heartbeat":
            raise RuntimeError("can't start new thread")
        start(thread)
        alive.append(thread)

    cfg = load_config("jobs/configs/grf.toml", ["model.shape=[8, 8]", "sampler.steps=10",
                                                "ensemble.members=2", "sampler.tol=0.1",
                                                f"output.path={tmp_path / 'h.zarr'}"])
    monkeypatch.setattr(threading.Thread, "start", no_beat)
    with pytest.raises(OutOfMemory, match="the claims' heartbeat thread could not start"):
        api.sample(cfg)
    assert not [t for t in alive if t.name == "piadm-writer" and t.is_alive()]
    assert not (tmp_path / "h.zarr.claims").exists()


def test_a_ctrl_c_through_the_api_writes_nothing_after_the_call_has_raised(tmp_path,
                                                                          monkeypatch):
    """The writer went on with the batch under way after api.sample raised: a script that
    then deleted the store found a folder of it made again, which a rerun refused."""
    import threading
    import time

    import zarr

    from pipeline import api, ensemble
    from pipeline.config import load_config

    real, started, writes = ensemble.write_batch, [], []

    def slow(*args, **kwargs):
        started.append(1)
        time.sleep(0.5)
        real(*args, **kwargs)
        writes.append(time.monotonic())

    monkeypatch.setattr(ensemble, "write_batch", slow)

    def stop():  # a Ctrl-C while a batch is being written
        if started:
            raise KeyboardInterrupt
        return False

    out = tmp_path / "k.zarr"
    cfg = load_config("jobs/configs/grf.toml", ["model.shape=[8, 8]", "sampler.steps=10",
                                                "ensemble.members=8", "ensemble.batch_size=2",
                                                "sampler.method=sequential-sde",
                                                f"output.path={out}"])
    with pytest.raises(KeyboardInterrupt):
        api.sample(cfg, stop=stop)
    raised = time.monotonic()
    assert not [t for t in threading.enumerate() if t.name == "piadm-writer"]
    assert all(at <= raised for at in writes)
    done = int(zarr.open_group(out, mode="r")["done"][:].sum())
    time.sleep(0.7)
    assert int(zarr.open_group(out, mode="r")["done"][:].sum()) == done


@pytest.mark.parametrize("name", ["piadm-writer", "piadm-heartbeat"])
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("slurm", [False, True])
def test_a_ctrl_c_as_a_thread_starts_leaves_no_thread_and_no_beat(tmp_path, monkeypatch, name,
                                                                   overwrite, slurm):
    """A Ctrl-C that lands while ``Thread.start`` waits for the new thread (a timer or a
    notebook's interrupt): the thread ran on for the rest of the process, a heartbeat kept
    its store "being filled by a live job", and every later run on it was refused. Run
    anew, and with output.overwrite over another configuration's store (a replacement's own
    heartbeat, taken first); under SLURM, where the job's id is taken by making its beat
    file before either thread starts."""
    if slurm:
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
    import threading

    from pipeline import api
    from pipeline.config import load_config

    start = threading.Thread.start

    def interrupted(thread):
        start(thread)
        if thread.name == name:
            raise KeyboardInterrupt

    out = tmp_path / "c.zarr"
    sets = ["model.shape=[8, 8]", "sampler.steps=10", "ensemble.members=2", "sampler.tol=0.1",
            f"output.path={out}"]
    if overwrite:
        api.sample(load_config("jobs/configs/grf.toml", [*sets, "sampler.seed=7"]))
        sets.append("output.overwrite=true")
    cfg = load_config("jobs/configs/grf.toml", sets)
    monkeypatch.setattr(threading.Thread, "start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        api.sample(cfg)
    monkeypatch.undo()
    assert not [t for t in threading.enumerate() if t.name == name and t.is_alive()]
    assert not list(tmp_path.glob("c.zarr.claims/job-*"))
    summary = api.sample(cfg)  # and the store is the next run's at once
    assert summary.members + summary.skipped == 2 and summary.held == (2, 2)

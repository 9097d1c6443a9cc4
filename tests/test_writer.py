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
        BackgroundWriter()


def test_any_other_thread_that_cannot_start_is_one_line_naming_the_limit():
    """zarr's pool or torch's threads under a low ulimit -v: a traceback (the heartbeat's
    and the writer's say their own)."""
    from pipeline.cli import _as_user_error
    from pipeline.errors import OutOfMemory

    from pipeline.errors import FailedElsewhere

    err = _as_user_error(RuntimeError("can't start new thread"), "sample")
    assert isinstance(err, OutOfMemory) and str(err) == (
        "sample: a thread could not start (can't start new thread): a limit on the address "
        "space (ulimit -v: no room for its stack) or on processes and threads (ulimit -u, a "
        "container's or job's pids limit) was met; raise it")
    # the other ranks' word for rank 0's: not theirs to say as their own
    elsewhere = FailedElsewhere("rank 0 failed: RuntimeError: can't start new thread")
    assert _as_user_error(elsewhere, "sample") is elsewhere


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

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
    with pytest.raises(OutOfMemory, match=r"raise the limit or set output.background = false"):
        BackgroundWriter()


def test_any_other_thread_that_cannot_start_is_one_line_naming_the_limit():
    """zarr's pool or torch's threads under a low ulimit -v: a traceback (the heartbeat's
    and the writer's say their own)."""
    from pipeline.cli import _as_user_error
    from pipeline.errors import OutOfMemory

    err = _as_user_error(RuntimeError("can't start new thread"), "sample")
    assert isinstance(err, OutOfMemory) and str(err) == (
        "sample: a thread could not start (can't start new thread): an address-space limit "
        "(ulimit -v) leaves no room for its stack; raise the limit")

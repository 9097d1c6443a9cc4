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

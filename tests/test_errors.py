"""User errors: work whose inputs are the same on every rank marks its errors collective."""
import pytest

from pipeline.errors import ConfigError, InputError, raised_by_every_rank


@pytest.mark.parametrize("kind", [ConfigError, InputError])
def test_an_error_raised_by_every_rank_keeps_its_class_and_message(kind):
    with pytest.raises(kind) as info:
        with raised_by_every_rank():
            raise kind("config: sampler.steps = 0: use steps >= 1")
    assert type(info.value) is kind
    assert str(info.value) == "config: sampler.steps = 0: use steps >= 1"
    assert info.value.collective is True


def test_other_errors_pass_through_unmarked():
    with pytest.raises(KeyError) as info:
        with raised_by_every_rank():
            raise KeyError("x")
    assert not getattr(info.value, "collective", False)


def test_a_write_failures_errno_survives_a_copy_and_a_pickle():
    """errno is an OSError slot its message does not rebuild: a claim's WriteFailed, sent
    to the group's ranks and made collective, reached API callers with errno None."""
    import copy
    import errno
    import pickle

    from pipeline.errors import WriteFailed

    said = WriteFailed.of(OSError(errno.ENOSPC, "No space left on device"), "writing to o.zarr")
    for again in (pickle.loads(pickle.dumps(said)), copy.copy(said), said.everywhere()):
        assert (type(again), str(again), again.errno) == (WriteFailed, str(said), errno.ENOSPC)
    assert said.everywhere().collective is True


def test_errors_made_from_their_fields_survive_a_copy_and_a_pickle():
    """Another rank's unpickling (on_every_rank) rebuilt PlannedElsewhere from its message as
    if it were the path: "output output out/x.zarr was made ... was made ..."."""
    import copy
    import pickle

    from pipeline.plan_store import PlannedElsewhere

    said = PlannedElsewhere("out/x.zarr")
    for again in (pickle.loads(pickle.dumps(said)), copy.copy(said)):
        assert (type(again), str(again), again.collective) == (type(said), str(said), True)
    assert str(said.everywhere("told")) == "told" and str(said).startswith("output out/x.zarr")
    with pytest.raises(AttributeError):
        said.collective = False  # fixed when made: a property of the error


def test_two_threads_changing_warning_filters_leave_the_processs_filters_as_they_were():
    """A thread entering piadm's warning block while another is inside waits for it: had both
    been inside at once, the one leaving last put back the other's filters, for good."""
    import threading
    import time
    import warnings

    from pipeline.warned import catching

    before = list(warnings.filters)
    second_inside, first_left = threading.Event(), threading.Event()

    def first():
        with catching():
            warnings.filterwarnings("ignore", message="first's")
            second_inside.wait(0.5)  # the second waits for this block to end: times out
        first_left.set()

    def second():
        with catching():
            warnings.filterwarnings("ignore", message="second's")
            second_inside.set()
            first_left.wait(10)

    a = threading.Thread(target=first)
    a.start()
    time.sleep(0.1)  # the first is inside
    b = threading.Thread(target=second)
    b.start()
    a.join(10)
    b.join(10)
    assert warnings.filters == before


def test_a_short_warning_block_runs_inside_a_long_one_elsewhere_without_waiting():
    """An evaluation's scoring (a long block) held the lock throughout: another thread's
    store opening waited minutes for it. It runs inside instead, and the filters come back."""
    import threading
    import time
    import warnings

    from pipeline.warned import catching

    before = list(warnings.filters)
    inside, short_done = threading.Event(), threading.Event()

    def long_block():
        with catching(record=True, long=True):
            warnings.simplefilter("default")
            inside.set()
            short_done.wait(10)

    def short_block():
        with catching():
            warnings.filterwarnings("ignore", message="a store's")
        short_done.set()

    a = threading.Thread(target=long_block)
    a.start()
    assert inside.wait(10)
    start = time.monotonic()
    b = threading.Thread(target=short_block)
    b.start()
    b.join(10)
    assert short_done.is_set() and time.monotonic() - start < 5  # did not wait for the long one
    a.join(10)
    assert warnings.filters == before

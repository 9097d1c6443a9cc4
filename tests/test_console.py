import pytest

from pipeline.comm import SerialComm
from pipeline.console import on_rank0, print0


def test_on_rank0_returns_the_result_and_marks_user_errors_as_shared():
    assert on_rank0(SerialComm(), lambda a, b: a + b, 2, b=3) == 5

    def broken():
        raise FileExistsError("out exists")

    with pytest.raises(FileExistsError, match="out exists") as info:
        on_rank0(SerialComm(), broken)
    assert info.value.collective is True


def test_print0_prints_on_rank_zero_only(capsys):
    class Rank1(SerialComm):
        rank = 1

    print0(SerialComm(), "hello")
    print0(Rank1(), "not me")
    assert capsys.readouterr().err == "hello\n"


def test_on_rank0_keeps_an_errors_class_and_what_it_carries():
    from pipeline.calibrate import Unreachable

    def unreachable():
        raise Unreachable("no tolerance fits", rungs=("a rung",))

    with pytest.raises(Unreachable) as info:
        on_rank0(SerialComm(), unreachable)
    assert info.value.collective is True and info.value.rungs == ("a rung",)

    def missing():
        raise FileNotFoundError(2, "No such file or directory", "in.zarr")

    with pytest.raises(FileNotFoundError) as info:
        on_rank0(SerialComm(), missing)
    err = info.value
    assert (err.errno, err.strerror, err.filename, err.collective) == (
        2, "No such file or directory", "in.zarr", True)
    assert type(err).__name__ == "FileNotFoundError" and str(err).endswith("'in.zarr'")
    import pickle

    again = pickle.loads(pickle.dumps(err))  # as a plain FileNotFoundError
    assert type(again) is FileNotFoundError and again.filename == "in.zarr"

    def fault():
        raise KeyError("x")

    with pytest.raises(KeyError) as info:
        on_rank0(SerialComm(), fault)
    assert not getattr(info.value, "collective", False)  # a fault still aborts every rank


def test_on_every_rank_raises_another_ranks_error_with_what_its_kind_carries():
    """Rebuilt from its kind and message alone, a StaleStore (whose constructor takes no
    `collective`) was a TypeError, and a WriteFailed lost its errno on every rank."""
    from pipeline.console import _told, on_every_rank
    from pipeline.errors import WriteFailed
    from pipeline.store_match import StaleStore

    class TwoRanks(SerialComm):
        size = 2

        def __init__(self, theirs):
            self.theirs = theirs

        def allgather_object(self, mine):
            return [mine, _told(self.theirs)]

    stale = StaleStore("output o.zarr was made with other network code", why="its code changed")
    with pytest.raises(StaleStore) as info:
        on_every_rank(TwoRanks(stale), lambda: 1)
    assert (str(info.value), info.value.why, info.value.collective) == (
        "output o.zarr was made with other network code (on rank(s) 1 of 2)",
        "its code changed", True)
    full = WriteFailed("writing members to o.zarr failed: No space left on device", errno=28)
    with pytest.raises(WriteFailed) as info:
        on_every_rank(TwoRanks(full), lambda: 1)
    assert info.value.errno == 28 and str(info.value).endswith("(on rank(s) 1 of 2)")


def test_a_fault_in_rank_0s_work_is_rank_0s_on_the_other_ranks():
    """Every rank re-raised rank 0's RuntimeError as its own: each printed the traceback,
    'rank 1 failed' first, naming a rank that had not."""
    from pipeline.errors import FailedElsewhere

    class Rank1(SerialComm):
        rank, size = 1, 2

        def bcast_object(self, obj, root):
            return None, RuntimeError("the disk controller went away")

    with pytest.raises(FailedElsewhere, match="^rank 0 failed: RuntimeError: the disk "
                                              "controller went away$"):
        on_rank0(Rank1(), lambda: None)
    with pytest.raises(RuntimeError, match="went away") as info:  # rank 0 keeps its own
        on_rank0(SerialComm(), lambda: (_ for _ in ()).throw(RuntimeError("went away")))
    assert not isinstance(info.value, FailedElsewhere)

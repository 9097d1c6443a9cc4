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

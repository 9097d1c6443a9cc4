import pytest

from pipeline.comm import SerialComm
from pipeline.console import on_rank0, print0


def test_on_rank0_returns_the_result_and_marks_errors_as_shared():
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

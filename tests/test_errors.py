"""User errors: work whose inputs are the same on every rank marks its errors collective."""
import pytest

from pipeline.errors import ConfigError, raised_by_every_rank
from pipeline.inputs import InputError


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

"""The names a configuration is checked against (pipeline/choices.py) are those the
implementing modules' registries hold."""
from pipeline import choices
from pipeline.grids import GRIDS
from pipeline.integrators import FORMS
from pipeline.noise import SOURCES


def test_the_checked_names_are_the_implemented_ones():
    assert tuple(GRIDS) == choices.GRIDS
    assert choices.SCHEDULER_GRID not in GRIDS  # built from the model's timesteps instead
    assert tuple(FORMS) == choices.FORMS
    assert SOURCES is choices.SOURCES

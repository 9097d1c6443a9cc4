"""The names a configuration is checked against (pipeline/choices.py) are those the
implementing modules' registries hold."""
from models.adapters import PREDICTIONS
from models.module import process_of
from pipeline import choices
from pipeline.grids import GRIDS
from pipeline.integrators import FORMS
from pipeline.noise import SOURCES


def test_the_checked_names_are_the_implemented_ones():
    assert tuple(GRIDS) == choices.GRIDS
    assert choices.SCHEDULER_GRID not in GRIDS  # built from the model's timesteps instead
    assert tuple(FORMS) == choices.FORMS
    assert SOURCES is choices.SOURCES


def test_the_module_model_names_are_the_implemented_ones():
    from pipeline.clock import ddpm_alphas_cumprod
    from pipeline.settings import ModelConfig

    assert PREDICTIONS == choices.PREDICTIONS
    for name in choices.PROCESSES:  # each builds its process
        assert process_of(ModelConfig(kind="module", process=name)) is not None
    for schedule in choices.BETA_SCHEDULES:
        assert len(ddpm_alphas_cumprod(schedule, 1e-4, 0.02, 10)) == 10

"""The names a configuration is checked against (pipeline/choices.py) are those the
implementing modules' registries hold."""
import pytest

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
    from pipeline.run import DTYPES

    assert tuple(DTYPES) == choices.DTYPE_NAMES


def test_every_registered_sampler_loads_and_reproduces_a_registered_sequential_one():
    """A typo in a registry entry's target or reference is met here, not as a traceback in a
    run; and the configuration reference lists every method a config may name."""
    from pathlib import Path

    from pipeline.samplers import REGISTRY

    methods = Path(__file__).parents[1].joinpath("docs", "configuration.md").read_text()
    methods = methods[methods.index("`sampler.method`"):methods.index("`auto` | `auto-ode`")]
    for name, entry in REGISTRY.items():
        assert callable(entry.load()), name
        assert REGISTRY[entry.reference].reference == entry.reference, name  # sequential
        # one that reproduces another is parallel: the planner and calibrate take it for so
        assert entry.reference == name or entry.sliced, name
        assert not entry.windowed or entry.default_window > 0, name  # its sampler.window = 0
        assert f"`{name}`" in methods, f"docs/configuration.md's sampler.method lacks {name}"


def test_the_configuration_reference_lists_what_auto_chooses_among():
    import re
    from pathlib import Path

    from pipeline.planner import FAMILIES

    text = Path(__file__).parents[1].joinpath("docs", "configuration.md").read_text()
    auto = text[text.index("`auto` | `auto-ode`:"):text.index("`auto-ode` their ODE forms")]
    assert re.findall(r"`([\w-]+)`", auto)[2:] == list(FAMILIES["auto"])
    quality = text[text.index("or `auto-quality`: the fastest of"):text.index("each at the fewest")]
    assert re.findall(r"`([\w-]+)`", quality)[1:] == list(FAMILIES["auto-quality"])


def test_the_module_model_names_are_the_implemented_ones():
    from pipeline.clock import BETAS, ddpm_alphas_cumprod
    from pipeline.settings import ModelConfig

    assert PREDICTIONS == choices.PREDICTIONS
    from models.module import CONTINUOUS

    assert set(choices.PROCESSES) == {"ddpm", *CONTINUOUS}
    for name in choices.PROCESSES:  # each builds its process
        assert process_of(ModelConfig(kind="module", process=name)) is not None
    assert tuple(BETAS) == choices.BETA_SCHEDULES
    for schedule in choices.BETA_SCHEDULES:
        assert len(ddpm_alphas_cumprod(schedule, 1e-4, 0.02, 10)) == 10


@pytest.mark.parametrize("shape", [(4,), (4, 4), (2, 4, 4)])
def test_the_names_output_variable_may_not_take_are_all_the_stores_own(shape):
    import numpy as np

    from pipeline.inputs import unconditional
    from pipeline.store import StoreSpec, _dataset

    spec = StoreSpec("unused", "time", np.arange(2), 2, 2, "field", shape, "float32", "d", {},
                     sweeps=3)
    ds = _dataset(spec)
    own = {*ds.variables, *ds.dims} - {"field", "time"}
    assert own <= {*choices.STORE_VARIABLES, *choices.STORE_DIMS, *choices.FIELD_DIMS[len(shape)]}
    assert unconditional().dim in choices.STORE_DIMS  # the item dim without an input

"""The names and sizes a configuration is checked against, whose owners import torch or
zarr: the names some settings choose among, the store's own names, the U-Net's group count.

They are declared here, in a module that imports nothing, so that checking a configuration
(``pipeline.validation``, hence ``piadm config``) loads neither. Each owner keys its
registry by these names or uses these values; ``tests/test_choices.py`` checks that the two
agree.
"""

GRIDS = ("ou", "uniform", "edm")  # sampler.grid: the families of pipeline.grids.GRIDS
SCHEDULER_GRID = "scheduler"  # sampler.grid: the model's own timesteps (a diffusers scheduler's)
FORMS = ("exponential", "eps")  # sampler.form: the step maps of pipeline.integrators.FORMS
SOURCES = ("host", "device")  # sampler.noise: who fills pipeline.noise.Noise's draws
DTYPE_NAMES = ("float32", "float64")  # sampler.dtype: pipeline.run.DTYPES
ON_DIVERGENCE = ("sequential", "error")  # sampler.on_divergence: pipeline.samplers.picard
OU_KNEE = 1.0  # sampler.knee: where the ou grid's steps turn geometric (pipeline.grids)
EDM_RHO = 7.0  # the edm grid's rho (Karras et al. 2022; pipeline.grids)

# [model] of a bring-your-own network (models/module_check.py checks them)
PREDICTIONS = ("score", "eps", "x0", "v", "velocity")  # model.prediction: models.adapters
PROCESSES = ("ddpm", "vp-linear", "vp-cosine", "ve", "edm", "flow")  # model.process: models.module
INPUT_SCALES = ("native", "unit")  # model.input_scale: the process's own state, or unit variance
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")  # model.beta_schedule: pipeline.clock

# pipeline.store's own names, which output.variable may not take (tests/test_choices.py builds
# a store to check them): its bookkeeping variables, the dims it makes besides
# input.item_dim ("item" without an input), and a field's dims by its number of axes (only
# those of the run's fields: a 2-D field leaves "z", e.g. geopotential, free)
STORE_VARIABLES = ("done", "seed", "rounds", "model_calls", "residual")
STORE_DIMS = ("item", "member", "sweep")
FIELD_DIMS = {1: ("x",), 2: ("y", "x"), 3: ("z", "y", "x")}
# names a field's dims may go by in the data, read as piadm's y and x (lat, lon)
GEOGRAPHIC = {"lat": "y", "latitude": "y", "lon": "x", "longitude": "x", "rlat": "y", "rlon": "x",
              "south_north": "y", "west_east": "x"}  # rotated poles', WRF's
# field axes whose values are longitudes in degrees, equal modulo 360 (-180 .. 180, 0 .. 360)
LONGITUDES = ("lon", "longitude", "rlon")

# train.channels: the U-Net's group norms (models.unet) split each width into this many groups
NORM_GROUPS = 8

# How far (in training standard deviations) an input may sit from a network's training
# fields: a thousand is no weather, but another unit (Pa for hPa, a scale factor) or a
# missing-value code; a network fed such values overflows and its NaN blames the network.
# Training's condition is normalised by the target's statistics, so the same bound holds it.
MOST_TRAINING_STDS = 1e3


def resolved_wavenumber(n: int) -> int:
    """The largest wavenumber per axis that the 2/3 rule keeps on an n-point grid (k < n/3):
    the Kolmogorov solver's (``pipeline.kolmogorov``) and the bound of data.forcing_wavenumber."""
    return -(-n // 3) - 1

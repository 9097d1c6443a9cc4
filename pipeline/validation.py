"""The checks a configuration's values must pass beyond their types: each in its range, and
those that must agree across sections. Each failure is a one-line ``ConfigError`` that names
the key and the fix; ``pipeline.config`` runs ``validate`` on every configuration it builds.
"""
from __future__ import annotations

import math
import os

from pipeline.choices import (DTYPE_NAMES, FIELD_DIMS, FORMS, GRIDS, NORM_GROUPS, ON_DIVERGENCE,
                              SCHEDULER_GRID, SOURCES, STORE_DIMS, STORE_VARIABLES,
                              resolved_wavenumber)
from pipeline.errors import ConfigError, did_you_mean
from pipeline.samplers.options import THETAS, WINDOW_SPLITS
from pipeline.settings import (AUTO_METHODS, WAITS, BenchConfig, Config, DataConfig, ModelConfig,
                               ParallelConfig, SamplerConfig, TrainConfig, open_kind)
from pipeline.value_checks import INT64_MAX, check, check_values

# The largest sampler.u_max. A parallel sampler's prefix sums over a block or window carry
# factors up to e^{span/2} of the u it spans, and past about 40 float32 keeps no digit of them:
# on grf 8x8 at 20 steps piadm-ode (blocks of 8) ended 0.94 from its sequential path at
# u_max = 80 (every member exactly 0 at 100), pc-window-ode (window 8) 0.57 at 90 and 19 at 100,
# and window (200 steps) went NaN at 100, all within 4e-4 at 40 (piadm's blocks since their
# sum runs in float64 where it spans a growth past 2^8, picard.SCAN_GROWTH: before, a block of
# 7 steps from 40 ended 1.0 away). No data is left there to sample from: e^{-40} = 4e-18 of
# it (a noise of e^{20} = 5e8 times its scale).
U_MAX = 40.0
U_MIN_FLOOR = 1e-10  # the smallest sampler.u_min: see _check_grid
CFL_LEAST = 1e-3  # the smallest data.cfl: 500 times the default's steps
# The most damping the Langevin corrector's velocity may take over its length,
# corrector_gamma x corrector_length: its prefix sums divide by e^{-that}, which float32
# rounds to 0 past 87 (NaN at 120 on grf 8x8); past a few units the velocity is gone anyway.
MOST_CORRECTOR_DAMPING = 80.0
MAX_COMPONENTS = 1 << 16  # model.components: 1e8 ran out of memory, not naming the key
# A path's time grid and its samplers' per-step tables are float64 arrays of steps + 1 (a
# window's tables a few more), where samplers take 10 to 10^4 steps: 10^8 held 9 GB and
# calibrated for over 9 minutes on grf 8x8 without reaching its first rung's end, the
# finish a signal waits for (at 10^6: 80 MB and a rung of seconds to minutes)
STEPS_MAX = 10**6


# generate-data: the shortest data.interval (closer snapshots are the same field), the most
# steps data.dt_max may imply (days of a small grid's steps), and the fastest laminar
# speed data.forcing may drive (past it the CFL steps are too short, or float64 overflows)
MIN_INTERVAL = 1e-6
MOST_STEPS = 1e9
MOST_SPEED = 1e6
# model.emulate_ms: the most an emulated call's latency or per-item time may be
MOST_EMULATED_MS = 60_000.0


def unquoted(value) -> str:
    """": write 1e-3 without quotes" where ``value`` is a number written as a string."""
    if not isinstance(value, str):
        return ""
    try:
        number = math.isfinite(float(value.strip()))
    except ValueError:
        number = False
    return f": write {value.strip()} without quotes" if number else ""


def _check_unique(values: tuple, key: str, why: str) -> None:
    seen, twice = set(), None
    for v in values:  # a set, not a scan of those before: long lists of labels are common
        if v in seen:
            twice = v
            break
        seen.add(v)
    shown = list(values) if len(values) <= 8 else f"[{len(values)} values]"
    check(twice is None, key, f"= {shown} names {twice!r} twice ({why}): list each once")


def _check_parallel(p: ParallelConfig, s: SamplerConfig) -> None:
    """A layout must give every time slice at least one point to own."""
    from pipeline.samplers import REGISTRY

    check(0 <= p.threads <= 65536, "parallel.threads",
          f"= {p.threads} must be in [0, 65536] (0: automatic)")
    check(p.wait in WAITS, "parallel.wait", f"= {p.wait!r} must be one of {', '.join(WAITS)}")
    check(p.time_slices == "auto" or (isinstance(p.time_slices, int) and p.time_slices >= 1),
          "parallel.time_slices", f"= {p.time_slices!r} must be a number >= 1 or \"auto\""
          + unquoted(p.time_slices))
    if p.time_slices == "auto" or s.method in AUTO_METHODS:
        return  # the planner picks a layout that fits
    registered = REGISTRY[s.method]
    if not registered.sliced:
        return  # it runs whole on every slice, whatever its block of noise draws
    for key, n in registered.points(s).items():
        asked = getattr(s, key) or registered.default_window  # 0 only for the window
        capped = key != "steps" and asked > s.steps  # the path is shorter than the setting
        more = ("sampler.steps" if capped else f"sampler.steps and sampler.{key}"
                if key != "steps" and n == s.steps else f"sampler.{key}")
        plural = "s" if n != 1 else ""
        check(p.time_slices <= n, "parallel.time_slices",
              f"= {p.time_slices} is more than the {n} point{plural} of sampler.{key}"
              + (f" (at most sampler.steps = {s.steps})" if capped else "")
              + f": use at most {n} time slice{plural}, or raise {more}")


# The [model] keys that only some of piadm's own kinds read ("weights": a gmm's list, a
# module's file); the rest (shape, condition, data_bound, emulate_ms, tf32) every kind reads.
READ_BY = {"slope": ("grf",), "length": ("grf",), "components": ("gmm",), "spread": ("gmm",),
           "std": ("gmm",), "seed": ("gmm",), "weights": ("gmm", "module"),
           "checkpoint": ("unet",), "guide": ("unet",), "guidance": ("unet",),
           "target": ("module",), "prediction": ("module",), "process": ("module",),
           "beta_schedule": ("module",), "beta_start": ("module",), "beta_end": ("module",),
           "train_steps": ("module",), "input_scale": ("module",), "path": ("diffusers",)}


def _check_model_keys(m: ModelConfig) -> None:
    """A key set (off its default) that the model's kind does not read is refused: a module's
    factory argument written at the top of [model] under a name an exact model uses (std,
    seed) never reached the factory, and a diffusers folder's prediction comes from its
    scheduler, whatever model.prediction said."""
    from models import MODELS

    if m.kind not in MODELS:  # a plugin's kind: which keys it reads is its own
        return
    default = ModelConfig()
    for key, readers in READ_BY.items():
        value = getattr(m, key)
        check(m.kind in readers or value == getattr(default, key), f"model.{key}",
              f"= {value!r} is read by model.kind = {' or '.join(map(repr, readers))}, not "
              f"{m.kind!r}: remove it"
              + (" (a factory's own arguments go under [model.args])"
                  if m.kind == "module" else
                  " (a diffusers folder's scheduler config says what it predicts, and on "
                  "which schedule)" if m.kind == "diffusers" else ""))


def _check_model(m: ModelConfig) -> None:
    """Model parameters in their ranges: a NaN or a negative length would sample NaN fields;
    then the keys the model's kind reads (``_check_model_keys``)."""
    finite = math.isfinite
    check(finite(m.slope) and 0 <= m.slope <= 100, "model.slope",
          f"= {m.slope} must be a number in [0, 100] (the spectrum's power-law decay)")
    check(finite(m.length) and 0 < m.length <= 1e6, "model.length",
          f"= {m.length} must be a number in (0, 1e6] (grid points)")
    check(1 <= m.components <= MAX_COMPONENTS, "model.components",
          f"= {m.components} must be in [1, {MAX_COMPONENTS}] (a mixture's modes: its score "
          "weighs every one for every field of every call)")
    check(finite(m.spread) and 0 <= m.spread <= 1e6, "model.spread",
          f"= {m.spread} must be a number in [0, 1e6] (mode widths)")
    check(finite(m.std) and 1e-6 <= m.std <= 1e6, "model.std",
          f"= {m.std} must be a number in [1e-6, 1e6]")
    if isinstance(m.weights, str):  # a state-dict file
        check(m.kind == "module", "model.weights", f"= {m.weights!r} must be a list of mode "
              "weights (a state-dict file is for model.kind = 'module')")
    else:
        check(all(finite(w) and w >= 0 for w in m.weights)
              and (not m.weights or sum(m.weights) > 0), "model.weights",
              f"= {list(m.weights)} must be finite numbers >= 0, not all zero")
        check(not m.weights or len(m.weights) == m.components, "model.weights",
              f"has {len(m.weights)} values for model.components = {m.components}: give one each")
    check(not m.emulate_ms or (len(m.emulate_ms) == 2
                               and all(finite(v) and v >= 0 for v in m.emulate_ms)),
          "model.emulate_ms", f"= {list(m.emulate_ms)} must be [latency_ms, per_item_ms], "
          "finite numbers >= 0, or empty (off)")
    check(all(v <= MOST_EMULATED_MS for v in m.emulate_ms), "model.emulate_ms",
          f"= {list(m.emulate_ms)}: an emulated call of more than {MOST_EMULATED_MS:g} ms "
          "(latency or per item) is no accelerator's; a run could not stop between its calls")
    check(finite(m.guidance) and 1 <= m.guidance <= 20, "model.guidance",
          f"= {m.guidance} must be a number in [1, 20] (1: the checkpoint alone)")
    check(m.kind != "unet" or bool(m.checkpoint), "model.checkpoint",
          "must name a piadm train checkpoint for model.kind = 'unet' (e.g. "
          "models/checkpoints/kolmogorov_uncond.pt; a config that trains one before sampling "
          "names the file train.checkpoint writes)")
    check(not m.guide or m.kind == "unet", "model.guide",
          f"= {m.guide!r} guides a piadm U-Net: it needs model.kind = 'unet'")
    check(bool(m.guide) or m.guidance == 1, "model.guidance",
          f"= {m.guidance} needs a weaker checkpoint to guide away from: set model.guide")
    check(not m.guide or m.guidance > 1, "model.guide",
          f"= {m.guide!r} is unused at model.guidance = 1: set model.guidance > 1 (e.g. 2) "
          "or drop model.guide")
    _check_model_keys(m)


def _check_data(d: DataConfig) -> None:
    check(bool(d.path.strip()), "data.path", "must not be empty: name the store to write, "
          "e.g. out/kolmogorov.zarr")
    check(d.resolution >= 8 and d.resolution % 2 == 0, "data.resolution",
          f"= {d.resolution} must be an even number >= 8")
    check(d.coarse_factor >= 1 and d.resolution % d.coarse_factor == 0, "data.coarse_factor",
          f"= {d.coarse_factor} must divide data.resolution = {d.resolution}")
    check(d.viscosity > 0, "data.viscosity", f"= {d.viscosity} must be > 0")
    check(d.drag >= 0, "data.drag", f"= {d.drag} must be >= 0")
    # a tiny one makes the steps so short that the spin-up never ends (5e-324 ran on)
    check(CFL_LEAST <= d.cfl <= 1, "data.cfl", f"= {d.cfl} must be in [{CFL_LEAST:g}, 1]")
    check(d.dt_max > 0 and d.interval > 0 and d.spinup >= 0, "data.interval",
          "and data.dt_max must be > 0, data.spinup >= 0")
    check(d.snapshots >= 1 and d.chunk >= 1, "data.snapshots", "and data.chunk must be >= 1")
    check(d.interval >= MIN_INTERVAL, "data.interval",
          f"= {d.interval:g} is below {MIN_INTERVAL:g}: snapshots so close are the same field "
          "(and their time labels may be too)")
    total = d.spinup + d.snapshots * d.interval
    check(not math.isfinite(total) or total / d.dt_max <= MOST_STEPS, "data.dt_max",
          f"= {d.dt_max:g} takes at least {total / d.dt_max:.3g} steps for the "
          f"{total:g} time units of data.spinup + data.snapshots x data.interval, past "
          f"{MOST_STEPS:.0e} (days of steps): raise data.dt_max or lower those")
    check(not d.forcing < 0, "data.forcing", f"= {d.forcing:g} must be >= 0 (0 turns it off)")
    damping = d.viscosity * d.forcing_wavenumber**2 + d.drag
    laminar = d.forcing / damping if damping > 0 else 0.0  # (0: refused below)
    check(laminar <= MOST_SPEED, "data.forcing",
          f"= {d.forcing:g} drives the flow at speeds up to {laminar:.3g} (data.forcing / "
          f"(data.viscosity x data.forcing_wavenumber^2 + data.drag)), past {MOST_SPEED:g}: "
          "its time steps would be too short to simulate (or it overflows): lower "
          "data.forcing, or raise data.viscosity or data.drag")
    check(d.forcing_wavenumber >= 1, "data.forcing_wavenumber", "must be >= 1")
    top = resolved_wavenumber(d.resolution)  # past it the grid aliases the forcing
    check(d.forcing_wavenumber <= top, "data.forcing_wavenumber",
          f"= {d.forcing_wavenumber} is past the largest wavenumber data.resolution = "
          f"{d.resolution} resolves ({top}): lower it or raise data.resolution")


def _check_train(t: TrainConfig) -> None:
    check(0 < t.validation < 1, "train.validation", f"= {t.validation} must be in (0, 1)")
    check(t.batch_size >= 1 and t.steps >= 1, "train.batch_size", "and train.steps must be >= 1")
    # past 1 Adam's steps throw the weights out of float32 (1e300: a traceback in its step)
    check(0 < t.lr <= 1, "train.lr", f"= {t.lr} must be in (0, 1] (Adam's step size: U-Nets "
          "train at 1e-4 to 1e-3)")
    # log sigma of the training noise: EDM's -1.2 and 1.2; past these the levels leave float32
    check(math.isfinite(t.p_mean) and abs(t.p_mean) <= 10, "train.p_mean",
          f"= {t.p_mean} must be in [-10, 10] (the mean log noise level; EDM's is -1.2)")
    check(math.isfinite(t.p_std) and 0 < t.p_std <= 5, "train.p_std",
          f"= {t.p_std} must be in (0, 5] (the spread of log noise levels; EDM's is 1.2)")
    check(t.cache_mb >= 0, "train.cache_mb", f"= {t.cache_mb} must be >= 0 (0: read lazily)")
    check(0 <= t.ema < 1, "train.ema", f"= {t.ema} must be in [0, 1)")
    check(t.val_every >= 1 and t.log_every >= 1, "train.val_every",
          "and train.log_every must be >= 1")
    check(len(t.channels) >= 1 and all(c >= 1 and c % NORM_GROUPS == 0 for c in t.channels),
          "train.channels", f"= {list(t.channels)}: give one width per level, each a multiple "
          f"of {NORM_GROUPS} (the U-Net's group norms split it into {NORM_GROUPS} groups)")
    check(0 <= t.global_modes <= 16, "train.global_modes",
          f"= {t.global_modes} must be in [0, 16] (0: no global mixing)")
    check(not t.residual or bool(t.condition), "train.residual",
          "= true needs a coarse field to take the remainder from: set train.condition")
    for key, value in (("train.data", t.data), ("train.variable", t.variable),
                       ("train.checkpoint", t.checkpoint)):
        check(bool(value.strip()), key, "must not be empty")
    check(all(path.strip() for path in t.extra), "train.extra",
          f"= {list(t.extra)} holds an empty path: list the stores' paths")
    check(os.path.basename(t.checkpoint) not in (".", "..")
          and os.path.basename(os.path.normpath(t.checkpoint)) not in (".", ".."),
          "train.checkpoint", f"= {t.checkpoint!r} names a folder: give the checkpoint's file "
          "path, e.g. out/unet.pt")
    check(not t.condition or t.condition != t.variable, "train.condition",
          f"= {t.condition!r} is the field the model learns (train.variable): condition on "
          "its coarse version, e.g. 'vorticity_coarse'")
    check(not t.checkpoint.endswith(("/", os.sep)), "train.checkpoint",
          f"= {t.checkpoint!r} names a folder: give the checkpoint's file path, e.g. "
          f"{t.checkpoint.rstrip('/' + os.sep) or '.'}/unet.pt")
    stores = [os.path.realpath(path) for path in (t.data, *t.extra)]
    check(len(set(stores)) == len(stores), "train.extra",
          f"= {list(t.extra)} repeats a store (or train.data, whose held-out times would be "
          "trained on): list each other store once")


def _check_sampler(s: SamplerConfig, benched: tuple[str, ...] = ()) -> None:
    """The sampler's own keys in their ranges, and what the chosen method needs."""
    from pipeline.samplers import REGISTRY, SAMPLERS

    known = (*SAMPLERS, *AUTO_METHODS)
    check(s.method in known, "sampler.method", f"= {s.method!r} is unknown: use one of "
          f"{', '.join(known)}{did_you_mean(s.method, known)}")
    check(1 <= s.steps <= STEPS_MAX, "sampler.steps",
          f"= {s.steps} must be >= 1 and at most {STEPS_MAX} (samplers take 10 to 10^4; "
          "a longer path's tables fill memory, and its batches and calibration rungs, which a "
          "stop signal lets finish, run for hours)")
    check(s.block_size >= 1, "sampler.block_size", f"= {s.block_size} must be >= 1")
    check(s.max_sweeps >= 1, "sampler.max_sweeps", f"= {s.max_sweeps} must be >= 1")
    check(s.theta in THETAS, "sampler.theta",
          f"= {s.theta!r}: use one of {', '.join(THETAS)}")
    check(s.window_split in WINDOW_SPLITS, "sampler.window_split",
          f"= {s.window_split!r}: use one of {', '.join(WINDOW_SPLITS)}")
    number = isinstance(s.tol, float) and math.isfinite(s.tol) and s.tol >= 0
    check(s.tol is None or s.tol == "auto" or number,
          "sampler.tol", f"= {s.tol!r} must be a finite number >= 0 or \"auto\""
          + unquoted(s.tol))
    if s.method in REGISTRY:  # what the chosen sampler itself needs (declared with it)
        for key, problem in REGISTRY[s.method].problems(s):
            raise ConfigError(f"config: {key} {problem}")
    # the plan weighs windows, which stop on sampler.tol: without it the plan measured every
    # other sampler (minutes on a network) before the first window refused to run
    check(s.method not in AUTO_METHODS or s.tol is not None, "sampler.tol",
          f"must be set for sampler.method = {s.method!r}, whose plan weighs the sliding "
          "windows that stop on it: \"auto\" calibrates it for each sampler weighed, or give "
          "a number")
    check(s.window >= 0, "sampler.window", f"= {s.window} must be >= 0 (0: the method's own)")
    check(0 < s.distance < 1, "sampler.distance", f"= {s.distance} must be in (0, 1), e.g. 1e-3")
    _check_grid(s)
    check(s.dtype in DTYPE_NAMES, "sampler.dtype",
          f"= {s.dtype!r}: use {' or '.join(DTYPE_NAMES)}")
    check(s.noise in SOURCES, "sampler.noise",
          f"= {s.noise!r}: use host (the same draws on every device) or device (fast on GPUs)")
    check(s.on_divergence in ON_DIVERGENCE, "sampler.on_divergence",
          f"= {s.on_divergence!r}: use {' or '.join(map(repr, ON_DIVERGENCE))}")
    check(s.seed >= 0, "sampler.seed", f"= {s.seed} must be >= 0")
    check(s.churn >= 0 and math.isfinite(s.churn), "sampler.churn",
          f"= {s.churn} must be a number >= 0 (EDM's S_churn; 0 turns it off)")
    _check_corrector(s, benched)


def _check_grid(s: SamplerConfig) -> None:
    """The time grid's keys: the noise levels it spans, its knee, kind and update form."""
    check(math.isfinite(s.u_max) and s.u_max <= U_MAX, "sampler.u_max",
          f"= {s.u_max} must be a finite number <= {U_MAX:g}: past it a parallel sampler's "
          "float32 prefix sums keep no digit (members far from the sequential path, or NaN) "
          f"and add nothing (e^{{-u}} = {math.exp(-U_MAX):.0e} of the data is left at "
          f"{U_MAX:g}); the default is {SamplerConfig.u_max:g}")
    check(s.u_max > 0, "sampler.u_max", f"= {s.u_max} must be > 0: the noise level sampling "
          f"starts from (the default is {SamplerConfig.u_max:g})")
    check(math.isfinite(s.u_min) and 0 < s.u_min < s.u_max, "sampler.u_min",
          f"= {s.u_min} must be > 0 and below sampler.u_max = {s.u_max}")
    # below it the grid's steps crowd where no noise is left and the rest are too long: grf
    # 8x8 at 200 steps drew fields of std 1.26 at 1e-150 and 35 at 1e-310 where 1.0 is right
    check(s.u_min >= U_MIN_FLOOR, "sampler.u_min",
          f"= {s.u_min:g} must be at least {U_MIN_FLOOR:g} (smaller puts the grid's steps where "
          f"no noise is left and too few where it is; the default is {SamplerConfig.u_min:g})")
    check(s.knee > 0, "sampler.knee", f"= {s.knee} must be > 0")
    check(s.grid in (*GRIDS, SCHEDULER_GRID), "sampler.grid",
          f"= {s.grid!r} is unknown: use one of {', '.join((*GRIDS, SCHEDULER_GRID))}")
    check(s.form in FORMS, "sampler.form",
          f"= {s.form!r} is unknown: use one of {', '.join(FORMS)}")


def _check_corrector(s: SamplerConfig, benched: tuple[str, ...]) -> None:
    """The Langevin corrector's keys, and its step and damping where it runs (for the method,
    or for one that ``piadm bench`` compares: ``benched``)."""
    from pipeline.samplers import REGISTRY

    check(s.corrector_steps >= 0, "sampler.corrector_steps", "must be >= 0 (0 turns it off)")
    check(s.corrector_sweeps >= 1, "sampler.corrector_sweeps", "must be >= 1")
    check(s.corrector_length > 0 and s.corrector_gamma > 0, "sampler.corrector_length",
          "and sampler.corrector_gamma must be > 0")
    # a step of the Langevin corrector is h = length / steps noise scales, and a direction in
    # which the data hardly vary has a frequency of one per noise scale: a leapfrog-type step
    # is stable there below h = 2 (on grf 8x8 h = 5 still held, 12.5 grew 4x, 125 went NaN)
    # the corrector runs for the method, or for one piadm bench compares (``benched``)
    corrects = any(m in AUTO_METHODS or (m in REGISTRY and REGISTRY[m].corrector)
                   for m in (s.method, *benched))
    check(not corrects or not s.corrector_steps or s.corrector_length / s.corrector_steps < 2,
          "sampler.corrector_length",
          f"= {s.corrector_length:g} over sampler.corrector_steps = {s.corrector_steps} makes "
          f"steps of {s.corrector_length / max(s.corrector_steps, 1):.3g} noise scales, past "
          "2, where the Langevin corrector grows the data's thinnest directions instead of "
          "damping them: lower it or raise sampler.corrector_steps")
    check(not corrects or not s.corrector_steps
          or s.corrector_gamma * s.corrector_length <= MOST_CORRECTOR_DAMPING,
          "sampler.corrector_gamma",
          f"= {s.corrector_gamma:g} times sampler.corrector_length = {s.corrector_length:g} damps "
          f"the corrector's velocity by e^-{s.corrector_gamma * s.corrector_length:.3g}, past "
          f"e^-{MOST_CORRECTOR_DAMPING:g}, which float32 rounds to 0 (and the corrector to "
          "NaN): keep their product at most "
          f"{MOST_CORRECTOR_DAMPING:g} (the defaults: {SamplerConfig.corrector_gamma:g} and "
          f"{SamplerConfig.corrector_length:g})")


def _store_names(field_axes: int) -> tuple[str, ...]:
    """The names an ensemble store of fields of ``field_axes`` axes gives its own variables
    and dimensions ("item" for an unconditioned store's items)."""
    return (*STORE_VARIABLES, *STORE_DIMS, *FIELD_DIMS.get(field_axes, ()))


def check_variable(name: str, item_dim: str, field_axes: int,
                   key: str = "output.variable") -> None:
    """The field's name in the store (``key`` says where it came from) is a Zarr array's
    beside the store's own (of fields of ``field_axes`` axes): not one of those, nor a
    path."""
    if not name:
        return  # the default name
    taken = (*_store_names(field_axes), item_dim, "zarr.json")
    check(name == name.strip() and name not in (".", "..") and "/" not in name,
          key, f"= {name!r} is not a name a Zarr store can hold: give a plain "
          "name without '/' or surrounding spaces, e.g. 'vorticity'")
    check(name not in taken, key, f"= {name!r} is a name the store uses itself: use none of "
          f"{', '.join(taken)}" + ("" if key == "output.variable" else
                                   ", or name the ensemble's field with output.variable"))


def _check_conditioning(cfg: Config) -> None:
    """A conditioned model and its input come together, and suit the model's kind and grid."""
    from models import NETWORK_KINDS

    m = cfg.model
    check(m.condition in ("none", "mean", "coarse"), "model.condition",
          f"= {m.condition!r} is unknown: use 'none', 'mean' or 'coarse'")
    check((m.condition == "none") == (not cfg.input.path), "model.condition",
          f"= {m.condition!r} and input.path = {cfg.input.path!r}: a conditioned model needs an "
          "input and an input needs a conditioned model; set both or neither")
    check(m.condition != "coarse" or m.kind in NETWORK_KINDS,
          "model.condition", "= 'coarse' needs a network (model.kind = 'unet', 'module' or "
          "'diffusers'); exact models condition with 'mean'")
    # 'mean' shifts an exact model's fields by the item's input; on a network it ran as a
    # shift of the network's own samples, and one taking a condition was never given it
    check(m.condition != "mean" or m.kind not in NETWORK_KINDS,
          "model.condition", f"= 'mean' is for the exact models (each item's input is their "
                             f"mean): a network (model.kind = {m.kind!r}) is conditioned with "
                             "'coarse' (the input is given to it) or runs unconditioned "
                             "('none', with no input.path)")
    check(cfg.sampler.grid != SCHEDULER_GRID or m.kind == "diffusers", "sampler.grid",
          "= 'scheduler' samples on a diffusers scheduler's timesteps: it needs "
          "model.kind = 'diffusers'")
    # the input's item dimension becomes the store's first, in place of "item": it must not
    # clash with the others
    taken = tuple(name for name in _store_names(len(m.shape)) if name != "item")
    check(not cfg.input.path or cfg.input.item_dim not in taken, "input.item_dim",
          f"= {cfg.input.item_dim!r} is a name the ensemble store uses itself: rename that "
          f"dimension of the input (xarray's Dataset.rename) to none of {', '.join(taken)}")


def _check_bench(b: BenchConfig) -> None:
    """The bench's methods, sizes, members, seeds and repeats."""
    from pipeline.samplers import SAMPLERS

    check(len(b.methods) >= 1, "bench.methods",
          "is empty: name the methods to bench, e.g. [\"sequential-sde\", \"pc-window\"]")
    for method in b.methods:
        check(method in SAMPLERS, "bench.methods", f"has unknown method {method!r}: use any "
              f"of {', '.join(SAMPLERS)}{did_you_mean(method, SAMPLERS)}")
    _check_unique(tuple(b.methods), "bench.methods", "it would be benched twice")
    for size in b.sizes:
        check(1 <= len(size) <= 3 and min(size) >= 2, "bench.sizes",
              f"has bad shape {list(size)}: each needs 1 to 3 sizes >= 2")
    _check_unique(tuple(map(tuple, b.sizes)), "bench.sizes", "it would be benched twice")
    check(b.members >= 1, "bench.members", f"= {b.members} must be >= 1")
    check(b.quality_members >= 2, "bench.quality_members",
          f"= {b.quality_members} must be >= 2 (a spectrum's bootstrap resamples them)")
    check(b.seeds >= 1 and b.repeats >= 1, "bench.seeds", "and bench.repeats must be >= 1")


def validate(cfg: Config) -> None:
    """Cross-field checks; raises ConfigError naming the key."""
    from models import exact_kind, model_kinds

    m = cfg.model
    kinds = model_kinds()
    check(m.kind in kinds, "model.kind", f"= {m.kind!r} is unknown: use one of "
          f"{', '.join(kinds)}{did_you_mean(m.kind, kinds)}")
    check(not m.args or open_kind(m.kind), "model.args",
          f"are only for model.kind = 'module' or a plugin's kind, not {m.kind!r}")
    least = 2 if exact_kind(m.kind) else 1  # a network may take a channel axis of 1
    check(1 <= len(m.shape) <= 3 and min(m.shape) >= least, "model.shape",
          f"= {list(m.shape)} must have 1 to 3 sizes, each >= {least}")
    _check_sampler(cfg.sampler, cfg.bench.methods)
    for key, n in (("ensemble.members", cfg.ensemble.members),
                   ("ensemble.batch_size", cfg.ensemble.batch_size)):
        check(n >= 1, key, f"= {n} must be >= 1")
        check(n <= INT64_MAX, key, f"= {n} is more than the store's int64 index holds: use at "
              f"most {INT64_MAX}")
    check(bool(cfg.output.path.strip()), "output.path", "must not be empty")
    check_variable(cfg.output.variable, cfg.input.item_dim, len(m.shape))
    _check_conditioning(cfg)
    if m.kind == "module":
        from models.module_check import check_section

        check_section(m)
    check(not cfg.input.path or bool(cfg.input.variable), "input.variable",
          "must name the variable to condition on when input.path is set")
    check(len(cfg.input.range) in (0, 2), "input.range", "must be [first, last] or empty")
    check(not (cfg.input.items and cfg.input.range), "input.items",
          f"= {list(cfg.input.items)} and input.range = {list(cfg.input.range)} both choose the "
          "items: give one (e.g. --set 'input.range=[]' to take just input.items)")
    check(all(i >= 0 for i in cfg.parallel.items), "parallel.items", "must be item indices >= 0")
    _check_unique(cfg.parallel.items, "parallel.items", "its members would be sampled twice")
    _check_unique(cfg.input.items, "input.items", "the store would hold it twice")
    _check_data(cfg.data)
    _check_train(cfg.train)
    _check_parallel(cfg.parallel, cfg.sampler)
    _check_bench(cfg.bench)
    _check_model(m)
    check(m.data_bound >= 0 and math.isfinite(m.data_bound), "model.data_bound",
          f"= {m.data_bound} must be >= 0 and finite (0: the model's own bound)")
    c = cfg.calibrate
    check(c.members >= 1, "calibrate.members", f"= {c.members} must be >= 1")
    check(c.refine >= 0, "calibrate.refine", f"= {c.refine} must be >= 0 (0: the ladder's "
          "own tolerances only)")
    check(len(c.ladder) >= 1 and all(v > 0 for v in c.ladder)
          and all(a > b for a, b in zip(c.ladder, c.ladder[1:])), "calibrate.ladder",
          f"= {list(c.ladder)}: give tolerances > 0, loosest first (the first that keeps the "
          "members close is taken)")
    check_values(cfg)  # last: the checks above say more of the keys they know

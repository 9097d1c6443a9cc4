"""The run configuration: TOML parsed once, at the edge, into typed and validated values.

``load_config(path, overrides)`` reads a TOML file, applies ``key=value`` overrides (values
in TOML syntax; bare words are strings), rejects unknown keys and bad values with a one-line
``ConfigError`` that names the key and the fix, and returns a frozen ``Config``.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ConfigError  # noqa: F401  (raised here; its home is the leaf)
from pipeline.samplers.options import THETAS, Options  # the samplers' own defaults (no torch)


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "grf"
    shape: tuple[int, ...] = (64, 64)
    slope: float = 3.0  # grf: spectral slope of the power law
    length: float = 8.0  # grf: correlation length in grid points
    components: int = 3  # gmm: number of modes
    spread: float = 3.0  # gmm: mode separation in units of the mode width
    std: float = 0.5  # gmm: mode width before normalisation
    weights: tuple[float, ...] | str = ()  # gmm: mode weights (empty: equal); module: state dict
    seed: int = 0  # gmm: seed of the mode positions
    condition: str = "none"  # "mean" (exact models) or "coarse" (a conditional unet)
    checkpoint: str = ""  # unet: a piadm train checkpoint
    guide: str = ""  # unet: a weaker checkpoint of the same data to guide away from (autoguidance)
    guidance: float = 1.0  # unet: D = guide + guidance (checkpoint - guide); 1: no guidance
    data_bound: float = 0.0  # S for pc-window; 0: the model's own (exact, or the checkpoint's)
    emulate_ms: tuple[float, ...] = ()  # [latency, per_item]: an emulated accelerator; empty: off
    # Bring your own network (models/module.py, models/pretrained.py):
    target: str = ""  # module: "package.module:factory" returning a torch.nn.Module
    path: str = ""  # diffusers: a folder written by save_pretrained (model + scheduler config)
    prediction: str = ""  # module: score, eps, x0, v or velocity (diffusers: its scheduler's)
    process: str = ""  # module: ddpm, vp-linear, vp-cosine, ve, edm or flow
    beta_schedule: str = "linear"  # module, process ddpm: linear, scaled_linear or cosine
    beta_start: float = 1e-4  # module, process ddpm
    beta_end: float = 0.02  # module, process ddpm
    train_steps: int = 1000  # module, process ddpm: the schedule's timesteps
    input_scale: str = "native"  # module: the network sees the process's state, or "unit" (VP)
    args: dict = field(default_factory=dict)  # module: [model] keys piadm does not know


@dataclass(frozen=True)
class SamplerConfig:
    """The ``[sampler]`` section. Settings the samplers read take ``Options``' defaults, so each
    has one definition; what a method needs is declared with it (``pipeline.samplers``)."""

    method: str = "piadm-sde"
    steps: int = 1000
    block_size: int = 100
    tol: float | str | None = None  # a number, or "auto": calibrated (piadm calibrate)
    max_sweeps: int = Options.max_sweeps
    seed: int = 0
    grid: str = "ou"
    u_min: float = 1e-3
    u_max: float = 10.0
    knee: float = 1.0
    form: str = Options.form
    dtype: str = "float32"
    noise: str = "host"
    window: int = Options.window  # window points; 0: the method's own (window 100, pc-window 65)
    theta: str = Options.theta  # pc-window's corrector: "j_max" or "one" (docs/algorithms.md)
    distance: float = 1e-3  # what tol = "auto" aims at: relative distance to the sequential path
    on_divergence: str = Options.on_divergence
    denoise_final: bool = Options.denoise_final
    corrector_steps: int = Options.corrector_steps
    corrector_length: float = Options.corrector_length
    corrector_gamma: float = Options.corrector_gamma
    corrector_sweeps: int = Options.corrector_sweeps
    churn: float = Options.churn  # edm-heun's S_churn: 0 is its ODE, > 0 adds noise each step


@dataclass(frozen=True)
class CalibrateConfig:
    """``piadm calibrate`` and ``sampler.tol = "auto"``: members run both ways, tolerances to try."""

    members: int = 4
    ladder: tuple[float, ...] = (0.1, 0.05, 0.02, 0.01, 5e-3, 2e-3, 1e-3, 5e-4, 2e-4, 1e-4, 5e-5,
                                 2e-5, 1e-5, 5e-6, 2e-6, 1e-6)


@dataclass(frozen=True)
class EnsembleConfig:
    members: int = 8
    batch_size: int = 4


@dataclass(frozen=True)
class InputConfig:
    path: str = ""  # Zarr store of conditioning fields; empty: unconditional, one item
    variable: str = ""  # the variable to condition on
    item_dim: str = "time"  # the dimension whose labels are the work items
    items: tuple[str, ...] = ()  # labels to take (e.g. dates); empty: all
    range: tuple[str, ...] = ()  # [first, last] labels, inclusive; empty: all


@dataclass(frozen=True)
class OutputConfig:
    path: str = "out/ensemble.zarr"
    overwrite: bool = False
    variable: str = ""  # name of the sampled field; empty: the input variable, or "field"
    background: bool = True  # write while the next batch samples (a bounded writer thread)


@dataclass(frozen=True)
class ParallelConfig:
    # ranks that split each Picard block (world = groups x time_slices); "auto": the plan's pick
    time_slices: int | str = 1
    items: tuple[int, ...] = ()  # indices of the items this job fills; empty: all
    threads: int = 0  # torch CPU threads per rank; 0: this node's cores / ranks on it
    # glibc keeps freed memory for the next model call (pipeline.memory.keep_freed_memory):
    # faster on a CPU, for more resident memory; false leaves the allocator as it is
    keep_freed: bool = True
    # how a rank waits in a collective: "spin" (MPI's own wait, the lowest latency), "sleep"
    # (polled with short sleeps, leaving the core to ranks still computing), "auto": sleep
    # where this node's ranks need more threads than it has cores (pipeline.layout)
    wait: str = "auto"


@dataclass(frozen=True)
class DataConfig:
    """``piadm generate-data``: Kolmogorov flow snapshots (pipeline.kolmogorov)."""

    path: str = "out/kolmogorov.zarr"
    resolution: int = 64
    viscosity: float = 5e-3
    drag: float = 0.1
    forcing_wavenumber: int = 4
    forcing: float = 1.0
    cfl: float = 0.5
    dt_max: float = 0.05
    spinup: float = 30.0  # time units simulated and discarded before the first snapshot
    interval: float = 0.5  # time units between snapshots
    snapshots: int = 400
    chunk: int = 50  # snapshots per Zarr chunk (and per write)
    coarse_factor: int = 4  # block-average factor of the coarse copy
    seed: int = 0
    overwrite: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """``piadm train``: denoising score matching of a U-Net (models.unet) on a Zarr dataset."""

    data: str = "out/kolmogorov.zarr"
    variable: str = "vorticity"
    condition: str = ""  # a coarse variable to condition on (upsampled); empty: unconditional
    # learn the fine field minus the smooth upsampling of its coarse condition
    # (models.conditioning.spectral_upsample), at that remainder's own scale
    residual: bool = False
    validation: float = 0.2  # the last fraction of the time axis, held out
    # more stores (other trajectories) whose every time is trained on, beside train.data's
    # training split; the held-out split is train.data's alone
    extra: tuple[str, ...] = ()
    batch_size: int = 32  # global: split over the ranks
    steps: int = 2000
    lr: float = 2e-3  # also applied on resume, so a second run can anneal it
    ema: float = 0.999
    val_every: int = 200
    log_every: int = 50
    checkpoint: str = "out/unet.pt"
    resume: bool = True  # continue from the checkpoint when it exists
    # a checkpoint whose EMA weights start this run (fine-tuning; a fresh optimizer and step 0);
    # ignored when resuming
    init: str = ""
    seed: int = 0
    channels: tuple[int, ...] = (32, 64, 96)
    # lowest Fourier modes the coarsest level mixes over the whole field (models.unet.GlobalMix);
    # 0: none. A run with train.init from a network without it adds it, starting at zero
    global_modes: int = 0
    p_mean: float = -1.2  # log-normal training noise levels (EDM)
    p_std: float = 1.2
    cache_mb: float = 1024.0  # splits smaller than this are read into memory once; 0: lazy reads


@dataclass(frozen=True)
class BenchConfig:
    methods: tuple[str, ...] = ("sequential-sde", "piadm-sde", "window")
    sizes: tuple[tuple[int, ...], ...] = ()  # field shapes to sweep; empty: model.shape
    members: int = 4
    # --quality on a trained model: members whose spectra are compared with the held-out data
    quality_members: int = 64
    seeds: int = 1  # noise seeds sampler.seed, sampler.seed + 1, ...: rows per seed and a worst row
    repeats: int = 1  # timed runs per row: wall_s is their min, wall_med_s their median


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    text: str = ""  # the effective configuration as TOML-like text, for provenance

    @property
    def digest(self) -> str:
        """SHA-256 of the effective configuration text."""
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def store_digest(self) -> str:
        """SHA-256 of what decides the store's contents: every key except where it lives, the
        rank layout, the job's share of items, the writer and the bench. Runs that may fill
        one store share it."""
        kept = {name: {k: v for k, v in dataclasses.asdict(getattr(self, name)).items()
                       if (name, k) not in _LAYOUT_KEYS}
                for name in _SECTION_TYPES
                if name not in ("parallel", "data", "train", "bench", "calibrate")}
        return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


# Peer libraries ``piadm bench --peer`` runs beside piadm (``pipeline.peer``).
PEERS = ("diffusers",)

# sampler.method values that let ``piadm plan`` choose: among the SDE or the ODE samplers.
AUTO_METHODS = ("auto", "auto-ode", "auto-quality")

# parallel.wait values (``pipeline.layout.place_rank``).
WAITS = ("auto", "spin", "sleep")

_LAYOUT_KEYS = {("output", "path"), ("output", "overwrite"), ("output", "background")}


_SECTION_TYPES = {
    "model": ModelConfig, "sampler": SamplerConfig, "ensemble": EnsembleConfig,
    "input": InputConfig, "output": OutputConfig, "parallel": ParallelConfig, "data": DataConfig,
    "train": TrainConfig, "bench": BenchConfig, "calibrate": CalibrateConfig,
}


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(key: str, value, hint):
    """Check ``value`` against the annotation ``hint``; return it in the field's type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        for kind in kinds[:-1]:
            try:
                return _coerce(key, value, kind)
            except ConfigError:
                pass
        return _coerce(key, value, kinds[-1])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config: {key} must be a list, got {value!r}")
        inner = args[0]
        return tuple(_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config: {key} must be a table, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(
            f"config: {key} must be {hint.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


# model.kind values whose builder takes the [model] keys piadm does not know, as arguments
# (module; a kind an installed package registers is the same, see models.model_kinds)
OPEN_KINDS = ("module",)


def _open_kind(kind) -> bool:
    if kind in OPEN_KINDS:
        return True
    from models import MODELS

    return isinstance(kind, str) and kind not in MODELS


def _section(name: str, table: dict):
    cls = _SECTION_TYPES[name]
    hints = typing.get_type_hints(cls)
    values = {}
    if name == "model" and _open_kind(table.get("kind", cls.kind)):
        extra = {k: v for k, v in table.items() if k not in hints}
        table = {k: v for k, v in table.items() if k in hints}
        if extra:
            table["args"] = {**table.get("args", {}), **extra}
    for key, value in table.items():
        if key not in hints:
            raise ConfigError(
                f"config: unknown key {name}.{key}{_suggest(key, hints)}; "
                f"valid keys: {', '.join(hints)}"
            )
        values[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**values)


def _set(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    if len(keys) != 2 or not all(keys):
        raise ConfigError(f"--set {dotted}={raw}: the key must look like section.key, e.g. sampler.steps")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: a string
    tree.setdefault(keys[0], {})[keys[1]] = value


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _text(cfg: Config) -> str:
    """The effective configuration as TOML (keys left at None are omitted)."""
    lines = []
    for name in _SECTION_TYPES:
        lines.append(f"[{name}]")
        for key, value in dataclasses.asdict(getattr(cfg, name)).items():
            if name == "model" and key == "args":  # written back as the keys they were given as
                lines.extend(f"{k} = {_toml(v)}" for k, v in value.items())
            elif value is not None:
                lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def config_from_dict(tree: dict) -> Config:
    """Validate a nested dict {section: {key: value}} into a ``Config``."""
    for name in tree:
        if name not in _SECTION_TYPES:
            raise ConfigError(
                f"config: unknown section [{name}]{_suggest(name, _SECTION_TYPES)}; "
                f"valid sections: {', '.join(_SECTION_TYPES)}"
            )
    cfg = Config(**{n: _section(n, tree.get(n, {})) for n in _SECTION_TYPES})
    validate(cfg)
    return dataclasses.replace(cfg, text=_text(cfg))


def with_settings(cfg: Config, settings: dict) -> Config:
    """``cfg`` with ``{"section.key": value}`` replaced, validated again."""
    tree = {name: dataclasses.asdict(getattr(cfg, name)) for name in _SECTION_TYPES}
    for dotted, value in settings.items():
        section, key = dotted.split(".")
        tree[section][key] = value
    return config_from_dict(tree)


def read_toml(path: str | Path) -> dict:
    """The nested dict of the TOML file at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found: pass an existing TOML file")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read TOML at ``path`` (None: defaults only), apply ``section.key=value`` overrides."""
    tree = read_toml(path) if path is not None else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: use the form section.key=value")
        _set(tree, *item.split("=", 1))
    return config_from_dict(tree)


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"config: {key} {problem}")


def _check_parallel(p: ParallelConfig, s: SamplerConfig) -> None:
    """A layout must give every time slice at least one point to own."""
    from pipeline.samplers import REGISTRY

    _check(p.threads >= 0, "parallel.threads", f"= {p.threads} must be >= 0 (0: automatic)")
    _check(p.wait in WAITS, "parallel.wait", f"= {p.wait!r} must be one of {', '.join(WAITS)}")
    if p.time_slices == "auto" or s.method in AUTO_METHODS:
        _check(p.time_slices == "auto" or p.time_slices >= 1, "parallel.time_slices",
               f"= {p.time_slices!r} must be a number >= 1 or \"auto\"")
        return  # the planner picks a layout that fits
    _check(isinstance(p.time_slices, int) and p.time_slices >= 1, "parallel.time_slices",
           f"= {p.time_slices!r} must be a number >= 1 or \"auto\"")
    for key, n in REGISTRY[s.method].points(s).items():
        _check(p.time_slices <= n, "parallel.time_slices",
               f"= {p.time_slices} is more than the {n} points of sampler.{key}: "
               f"use at most {n} time slices, or raise sampler.{key}")


def _check_model(m: ModelConfig) -> None:
    """Model parameters in their ranges: a NaN or a negative length would sample NaN fields."""
    finite = math.isfinite
    _check(finite(m.slope) and 0 <= m.slope <= 100, "model.slope",
           f"= {m.slope} must be a number in [0, 100] (the spectrum's power-law decay)")
    _check(finite(m.length) and 0 < m.length <= 1e6, "model.length",
           f"= {m.length} must be a number in (0, 1e6] (grid points)")
    _check(m.components >= 1, "model.components", f"= {m.components} must be >= 1")
    _check(finite(m.spread) and 0 <= m.spread <= 1e6, "model.spread",
           f"= {m.spread} must be a number in [0, 1e6] (mode widths)")
    _check(finite(m.std) and 1e-6 <= m.std <= 1e6, "model.std",
           f"= {m.std} must be a number in [1e-6, 1e6]")
    if isinstance(m.weights, str):  # a state-dict file
        _check(m.kind == "module", "model.weights", f"= {m.weights!r} must be a list of mode "
               "weights (a state-dict file is for model.kind = 'module')")
    else:
        _check(all(finite(w) and w >= 0 for w in m.weights)
               and (not m.weights or sum(m.weights) > 0), "model.weights",
               f"= {list(m.weights)} must be finite numbers >= 0, not all zero")
        _check(not m.weights or len(m.weights) == m.components, "model.weights",
               f"has {len(m.weights)} values for model.components = {m.components}: give one each")
    _check(all(finite(v) for v in m.emulate_ms), "model.emulate_ms",
           f"= {list(m.emulate_ms)} must be finite numbers")
    _check(finite(m.guidance) and 1 <= m.guidance <= 20, "model.guidance",
           f"= {m.guidance} must be a number in [1, 20] (1: the checkpoint alone)")
    _check(not m.guide or m.kind == "unet", "model.guide",
           f"= {m.guide!r} guides a piadm U-Net: it needs model.kind = 'unet'")
    _check(bool(m.guide) or m.guidance == 1, "model.guidance",
           f"= {m.guidance} needs a weaker checkpoint to guide away from: set model.guide")
    _check(not m.guide or m.guidance > 1, "model.guide",
           f"= {m.guide!r} is unused at model.guidance = 1: set model.guidance > 1 (e.g. 2) "
           "or drop model.guide")


def _check_data(d: DataConfig) -> None:
    _check(d.resolution >= 8 and d.resolution % 2 == 0, "data.resolution",
           f"= {d.resolution} must be an even number >= 8")
    _check(d.coarse_factor >= 1 and d.resolution % d.coarse_factor == 0, "data.coarse_factor",
           f"= {d.coarse_factor} must divide data.resolution = {d.resolution}")
    _check(d.viscosity > 0, "data.viscosity", f"= {d.viscosity} must be > 0")
    _check(d.drag >= 0, "data.drag", f"= {d.drag} must be >= 0")
    _check(0 < d.cfl <= 1, "data.cfl", f"= {d.cfl} must be in (0, 1]")
    _check(d.dt_max > 0 and d.interval > 0 and d.spinup >= 0, "data.interval",
           "and data.dt_max must be > 0, data.spinup >= 0")
    _check(d.snapshots >= 1 and d.chunk >= 1, "data.snapshots", "and data.chunk must be >= 1")
    _check(d.forcing_wavenumber >= 1, "data.forcing_wavenumber", "must be >= 1")


def _check_train(t: TrainConfig) -> None:
    _check(0 < t.validation < 1, "train.validation", f"= {t.validation} must be in (0, 1)")
    _check(t.batch_size >= 1 and t.steps >= 1, "train.batch_size", "and train.steps must be >= 1")
    _check(t.lr > 0, "train.lr", f"= {t.lr} must be > 0")
    _check(0 <= t.ema < 1, "train.ema", f"= {t.ema} must be in [0, 1)")
    _check(t.val_every >= 1 and t.log_every >= 1, "train.val_every", "and train.log_every must be >= 1")
    _check(len(t.channels) >= 1 and min(t.channels) >= 8, "train.channels",
           f"= {list(t.channels)}: give one width >= 8 per level")
    _check(0 <= t.global_modes <= 16, "train.global_modes",
           f"= {t.global_modes} must be in [0, 16] (0: no global mixing)")
    _check(not t.residual or bool(t.condition), "train.residual",
           "= true needs a coarse field to take the remainder from: set train.condition")
    stores = [os.path.realpath(path) for path in (t.data, *t.extra)]
    _check(len(set(stores)) == len(stores), "train.extra",
           f"= {list(t.extra)} repeats a store (or train.data, whose held-out times would be "
           "trained on): list each other store once")


def _check_sampler(s: SamplerConfig) -> None:
    """The sampler's own keys in their ranges, and what the chosen method needs."""
    from pipeline.grids import GRIDS, SCHEDULER_GRID
    from pipeline.integrators import FORMS
    from pipeline.noise import SOURCES
    from pipeline.samplers import REGISTRY, SAMPLERS

    _check(s.method in SAMPLERS or s.method in AUTO_METHODS, "sampler.method",
           f"= {s.method!r} is unknown: use one of {', '.join((*SAMPLERS, *AUTO_METHODS))}")
    _check(s.steps >= 1, "sampler.steps", f"= {s.steps} must be >= 1")
    _check(s.block_size >= 1, "sampler.block_size", f"= {s.block_size} must be >= 1")
    _check(s.max_sweeps >= 1, "sampler.max_sweeps", f"= {s.max_sweeps} must be >= 1")
    _check(s.theta in THETAS, "sampler.theta",
           f"= {s.theta!r}: use one of {', '.join(THETAS)}")
    _check(s.tol is None or s.tol == "auto" or (isinstance(s.tol, float) and s.tol >= 0),
           "sampler.tol", f"= {s.tol!r} must be a number >= 0 or \"auto\"")
    if s.method in REGISTRY:  # what the chosen sampler itself needs (declared with it)
        for key, problem in REGISTRY[s.method].problems(s):
            raise ConfigError(f"config: {key} {problem}")
    _check(s.window >= 0, "sampler.window", f"= {s.window} must be >= 1 (0: the method's own)")
    _check(0 < s.distance < 1, "sampler.distance", f"= {s.distance} must be in (0, 1), e.g. 1e-3")
    _check(0 < s.u_min < s.u_max, "sampler.u_min",
           f"= {s.u_min} must be > 0 and below sampler.u_max = {s.u_max}")
    _check(s.knee > 0, "sampler.knee", f"= {s.knee} must be > 0")
    _check(s.grid in (*GRIDS, SCHEDULER_GRID), "sampler.grid",
           f"= {s.grid!r} is unknown: use one of {', '.join((*GRIDS, SCHEDULER_GRID))}")
    _check(s.form in FORMS, "sampler.form", f"= {s.form!r} is unknown: use one of {', '.join(FORMS)}")
    _check(s.dtype in ("float32", "float64"), "sampler.dtype", f"= {s.dtype!r}: use float32 or float64")
    _check(s.noise in SOURCES, "sampler.noise",
           f"= {s.noise!r}: use host (the same draws on every device) or device (fast on GPUs)")
    _check(s.on_divergence in ("sequential", "error"), "sampler.on_divergence",
           f"= {s.on_divergence!r}: use 'sequential' or 'error'")
    _check(s.seed >= 0, "sampler.seed", f"= {s.seed} must be >= 0")
    _check(s.corrector_steps >= 0, "sampler.corrector_steps", "must be >= 0 (0 turns it off)")
    _check(s.corrector_sweeps >= 1, "sampler.corrector_sweeps", "must be >= 1")
    _check(s.churn >= 0 and math.isfinite(s.churn), "sampler.churn",
           f"= {s.churn} must be a number >= 0 (EDM's S_churn; 0 turns it off)")
    _check(s.corrector_length > 0 and s.corrector_gamma > 0, "sampler.corrector_length",
           "and sampler.corrector_gamma must be > 0")


def _check_conditioning(cfg: Config) -> None:
    """A conditioned model and its input come together, and suit the model's kind and grid."""
    from pipeline.grids import SCHEDULER_GRID

    m = cfg.model
    _check(m.condition in ("none", "mean", "coarse"), "model.condition",
           f"= {m.condition!r} is unknown: use 'none', 'mean' or 'coarse'")
    _check((m.condition == "none") == (not cfg.input.path), "model.condition",
           f"= {m.condition!r} and input.path = {cfg.input.path!r}: a conditioned model needs an "
           "input and an input needs a conditioned model; set both or neither")
    _check(m.condition != "coarse" or m.kind in ("unet", "module", "diffusers"),
           "model.condition", "= 'coarse' needs a network (model.kind = 'unet', 'module' or "
           "'diffusers'); exact models condition with 'mean'")
    _check(cfg.sampler.grid != SCHEDULER_GRID or m.kind == "diffusers", "sampler.grid",
           "= 'scheduler' samples on a diffusers scheduler's timesteps: it needs "
           "model.kind = 'diffusers'")


def _check_bench(b: BenchConfig) -> None:
    """The bench's methods, sizes, members, seeds and repeats."""
    from pipeline.samplers import SAMPLERS

    for method in b.methods:
        _check(method in SAMPLERS, "bench.methods",
               f"has unknown method {method!r}: use any of {', '.join(SAMPLERS)}")
    for size in b.sizes:
        _check(1 <= len(size) <= 3 and min(size) >= 2, "bench.sizes",
               f"has bad shape {list(size)}: each needs 1 to 3 sizes >= 2")
    _check(b.members >= 1, "bench.members", f"= {b.members} must be >= 1")
    _check(b.quality_members >= 2, "bench.quality_members",
           f"= {b.quality_members} must be >= 2 (a spectrum's bootstrap resamples them)")
    _check(b.seeds >= 1 and b.repeats >= 1, "bench.seeds", "and bench.repeats must be >= 1")


def validate(cfg: Config) -> None:
    """Cross-field checks; raises ConfigError naming the key."""
    from models import model_kinds

    m = cfg.model
    kinds = model_kinds()
    _check(m.kind in kinds, "model.kind", f"= {m.kind!r} is unknown: use one of {', '.join(kinds)}")
    _check(not m.args or _open_kind(m.kind), "model.args",
           f"are only for model.kind = 'module' or a plugin's kind, not {m.kind!r}")
    least = 2 if m.kind in ("grf", "gmm") else 1  # a network may take a channel axis of 1
    _check(1 <= len(m.shape) <= 3 and min(m.shape) >= least, "model.shape",
           f"= {list(m.shape)} must have 1 to 3 sizes, each >= {least}")
    _check_sampler(cfg.sampler)
    _check(cfg.ensemble.members >= 1, "ensemble.members",
           f"= {cfg.ensemble.members} must be >= 1")
    _check(cfg.ensemble.batch_size >= 1, "ensemble.batch_size",
           f"= {cfg.ensemble.batch_size} must be >= 1")
    _check(bool(cfg.output.path), "output.path", "must not be empty")
    _check_conditioning(cfg)
    if m.kind == "module":
        from models.module import check_section

        check_section(m)
    _check(not cfg.input.path or bool(cfg.input.variable), "input.variable",
           "must name the variable to condition on when input.path is set")
    _check(len(cfg.input.range) in (0, 2), "input.range", "must be [first, last] or empty")
    _check(all(i >= 0 for i in cfg.parallel.items), "parallel.items", "must be item indices >= 0")
    _check_data(cfg.data)
    _check_train(cfg.train)
    _check_parallel(cfg.parallel, cfg.sampler)
    _check_bench(cfg.bench)
    _check_model(m)
    _check(not m.emulate_ms or (len(m.emulate_ms) == 2 and min(m.emulate_ms) >= 0),
           "model.emulate_ms", f"= {list(m.emulate_ms)} must be [latency_ms, per_item_ms], "
           "both >= 0, or empty (off)")
    _check(m.data_bound >= 0 and math.isfinite(m.data_bound), "model.data_bound",
           f"= {m.data_bound} must be >= 0 and finite (0: the model's own bound)")
    c = cfg.calibrate
    _check(c.members >= 1, "calibrate.members", f"= {c.members} must be >= 1")
    _check(len(c.ladder) >= 1 and all(v > 0 for v in c.ladder), "calibrate.ladder",
           f"= {list(c.ladder)}: give tolerances > 0, loosest first")

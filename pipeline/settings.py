"""The settings: every key of every section of a run's configuration, with its one default.

``pipeline.config`` reads TOML into these frozen dataclasses; ``pipeline.validation`` holds
the checks their values must pass.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from pipeline.choices import OU_KNEE
from pipeline.samplers.options import Options  # the samplers' own defaults (no torch)


@dataclass(frozen=True)
class ModelConfig:
    """The ``[model]`` section: which score model, its field shape and the keys of its kind
    (exact ``grf``/``gmm``, a trained ``unet``, a user ``module`` or a ``diffusers`` folder)."""

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
    tf32: bool = False  # CUDA: TensorFloat-32 convolutions and matmuls (faster; ~5e-4 rounding)
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
    knee: float = OU_KNEE
    form: str = Options.form
    dtype: str = "float32"
    noise: str = "host"
    window: int = Options.window  # window points; 0: the method's own (window 100, pc-window 65)
    # pc-window's corrector: "j_max", "one" or "secant" (docs/algorithms.md)
    theta: str = Options.theta
    # how pc-window's time slices share its window: "slots" or "replicated" (docs/algorithms.md)
    window_split: str = Options.window_split
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
    # down to 1e-7: the ODE window's distance was still falling at 1e-6 on larger fields
    # (GRF 256x256 reaches 3.7e-4 at 5e-7 on the CPU; docs/benchmarks.md, "On a GPU")
    ladder: tuple[float, ...] = (0.1, 0.05, 0.02, 0.01, 5e-3, 2e-3, 1e-3, 5e-4, 2e-4, 1e-4, 5e-5,
                                 2e-5, 1e-5, 5e-6, 2e-6, 1e-6, 5e-7, 2e-7, 1e-7)
    # rungs tried between the first that passes and the looser one before it, each halving the
    # gap on a log scale (0: the ladder's own tolerances only)
    refine: int = 1


@dataclass(frozen=True)
class EnsembleConfig:
    """The ``[ensemble]`` section: members per work item, and how many sample in one call."""

    members: int = 8
    batch_size: int = 4


@dataclass(frozen=True)
class InputConfig:
    """The ``[input]`` section: the Zarr store and variable that condition the members, and
    which of its items (labels along ``item_dim``) to take."""

    path: str = ""  # Zarr store of conditioning fields; empty: unconditional, one item
    variable: str = ""  # the variable to condition on
    item_dim: str = "time"  # the dimension whose labels are the work items
    items: tuple[str, ...] = ()  # labels to take (e.g. dates); empty: all
    range: tuple[str, ...] = ()  # [first, last] labels, inclusive; empty: all


@dataclass(frozen=True)
class OutputConfig:
    """The ``[output]`` section: the ensemble store, and how it is written."""

    path: str = "out/ensemble.zarr"
    overwrite: bool = False
    variable: str = ""  # the sampled field's name; empty: the model's training variable, else
    # the input's, else "field"
    background: bool = True  # write while the next batch samples (a bounded writer thread)


@dataclass(frozen=True)
class ParallelConfig:
    """The ``[parallel]`` section: how the ranks divide (ensemble groups x time slices), which
    items this job fills, and how each rank uses its cores."""

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
    """The ``[bench]`` section: methods and field shapes ``piadm bench`` compares, members,
    noise seeds and timed repeats."""

    methods: tuple[str, ...] = ("sequential-sde", "piadm-sde", "window")
    sizes: tuple[tuple[int, ...], ...] = ()  # field shapes to sweep; empty: model.shape
    members: int = 4
    # --quality on a trained model: members whose spectra are compared with the held-out data
    quality_members: int = 64
    seeds: int = 1  # noise seeds sampler.seed, sampler.seed + 1, ...: rows per seed and a worst row
    repeats: int = 1  # timed runs per row: wall_s is their min, wall_med_s their median


@dataclass(frozen=True)
class Config:
    """A whole run's configuration, one frozen dataclass per section, as ``pipeline.config``
    read and validated it."""

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
    # (key, path) of model files found elsewhere than the store at output.path names them,
    # with its model's bytes (``identity.as_stored``): the store's spelling in its identity
    # and ``text``, while the model loads from where the files are now
    stored_as: tuple[tuple[str, str], ...] = ()

    @property
    def digest(self) -> str:
        """SHA-256 of the effective configuration text."""
        return hashlib.sha256(self.text.encode()).hexdigest()

    def store_settings(self) -> dict:
        """What decides the store's contents, {section: {key: value}}: every key except where
        it lives, the rank layout, the members per batch, the job's share of items, the
        writer and the bench."""
        settings = {name: {k: v for k, v in dataclasses.asdict(getattr(self, name)).items()
                           if (name, k) not in LAYOUT_KEYS}
                    for name in SECTION_TYPES
                    if name not in ("parallel", "data", "train", "bench", "calibrate")}
        for key, path in self.stored_as:
            section, name = key.split(".")
            settings[section][name] = path
        return settings

    @property
    def store_digest(self) -> str:
        """SHA-256 of ``store_settings``: runs that may fill one store share it."""
        return _settings_digest(self.store_settings())

    def legacy_store_digest(self, batch_size: int) -> str:
        """The digest piadm gave these settings at ``batch_size`` before the batch size left
        the store's identity (2026-12): a store it made is still this configuration's
        (``pipeline.identity``), resumed at any batch size and brought up to date."""
        old = self.store_settings()
        old["ensemble"]["batch_size"] = batch_size
        return _settings_digest(old)

    def members_digest(self, members: int) -> str:
        """The digest of these settings with ``members`` in ensemble.members: a store this
        configuration made with fewer members is its own, grown (``pipeline.identity``)."""
        fewer = self.store_settings()
        fewer["ensemble"]["members"] = members
        return _settings_digest(fewer)


def _settings_digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


# Peer libraries ``piadm bench --peer`` runs beside piadm (``pipeline.peer``).
PEERS = ("diffusers",)

# sampler.method values that let ``piadm plan`` choose: among the SDE or the ODE samplers.
# The one of them that also picks each sampler's steps, at equal quality (``piadm plan``).
EQUAL_QUALITY = "auto-quality"
AUTO_METHODS = ("auto", "auto-ode", EQUAL_QUALITY)



def needs_plan(cfg: Config) -> bool:
    """Whether the run leaves its sampler or its time slices to the planner."""
    return cfg.sampler.method in AUTO_METHODS or cfg.parallel.time_slices == "auto"


# parallel.wait values (``pipeline.layout.place_rank``).
WAITS = ("auto", "spin", "sleep")

# The settings that name a file or folder whose contents the store was made from
FILE_KEYS = ("input.path", "model.checkpoint", "model.guide", "model.path", "model.weights")

# Settings that do not decide a store's contents. The members are the same at any
# ensemble.batch_size (each member's noise is keyed by its index, and a window sampler keeps a
# window per member), so a run resumed with a smaller batch (after running out of memory) keeps
# the members already written: the store's own batches stay its units of work. How the time
# slices share pc-window's window changes its rounding only, as the time slices themselves do.
LAYOUT_KEYS = {("output", "path"), ("output", "overwrite"), ("output", "background"),
               ("ensemble", "batch_size"), ("sampler", "window_split")}


SECTION_TYPES = {
    "model": ModelConfig, "sampler": SamplerConfig, "ensemble": EnsembleConfig,
    "input": InputConfig, "output": OutputConfig, "parallel": ParallelConfig, "data": DataConfig,
    "train": TrainConfig, "bench": BenchConfig, "calibrate": CalibrateConfig,
}


# model.kind values whose builder takes the [model] keys piadm does not know, as arguments
# (module; a kind an installed package registers is the same, see models.model_kinds)
OPEN_KINDS = ("module",)


def open_kind(kind) -> bool:
    """Whether ``model.kind`` takes ``[model]`` keys that piadm does not know as its builder's
    arguments: ``module``, or a kind that an installed package registers."""
    if kind in OPEN_KINDS:
        return True
    from models import MODELS

    return isinstance(kind, str) and kind not in MODELS

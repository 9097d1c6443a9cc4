"""From a validated Config to samples: the pieces the CLI and the Python API share."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

import pipeline
from pipeline.choices import SCHEDULER_GRID
from pipeline.clock import trained_top
from pipeline.errors import ConfigError
from pipeline.grids import Grid, RepeatedSteps, make_grid, scheduler_grid
from pipeline.noise import Noise, host_fingerprint
from pipeline.samplers import REGISTRY, SAMPLERS, Options, Stats
from pipeline.samplers.common import check_finite
from pipeline.samplers.options import CHURNS
from pipeline.settings import Config, SamplerConfig

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def unbounded_note(shape) -> str:
    """What a pc-window run without S (``model_data_bound`` infinite) is told."""
    return (f"note: field {'x'.join(map(str, shape))} has no S (model.data_bound unset, and the "
            "model records none): pc-window assumes no bound, which stays exact but certifies "
            "fewer points a round; set model.data_bound to the largest power of one Fourier "
            "mode of the data in the network's units, where you know it")


def model_data_bound(model, section) -> float:
    """S for pc-window: ``model.data_bound`` when set (> 0), else the model's own (exact for
    grf and gmm, recorded with a trained checkpoint), else inf (assume nothing)."""
    return section.data_bound or float(getattr(model, "data_bound", float("inf")))


# the samplers' options that the [sampler] section sets, by the same name (its defaults are
# Options'); tol is resolved first
_CONFIGURED = tuple(sorted({f.name for f in dataclasses.fields(Options)}
                           & {f.name for f in dataclasses.fields(SamplerConfig)} - {"tol"}))


def sampler_options(s: SamplerConfig, *, tol: float | None = None,
                    data_bound: float = float("inf")) -> Options:
    """The sampler's typed options from the sampler section; ``tol`` replaces the configured
    one ("auto" is resolved by ``pipeline.calibrate.resolve_tol``, for the method run)."""
    if tol is None and not isinstance(s.tol, str):
        tol = s.tol
    return Options(**{name: getattr(s, name) for name in _CONFIGURED}, tol=tol,
                   data_bound=data_bound)


def sampler_grid(s: SamplerConfig, model=None) -> Grid:
    """The blocked OU-clock grid of the sampler section; ``sampler.grid = "scheduler"`` takes
    the model's own (``model.scheduler_u``)."""
    if s.grid == SCHEDULER_GRID:
        try:
            return scheduler_grid(model.scheduler_u(s.steps), s.block_size)
        except ConfigError:  # the scheduler's own refusal, which names its fix
            raise
        except RepeatedSteps as err:  # no sampler.steps mends it
            raise ConfigError(f"config: sampler.grid = 'scheduler': {err}: take one of piadm's "
                              "own grids (sampler.grid = \"ou\", \"uniform\" or \"edm\"), "
                              "whose samplers are piadm's") from None
        except ValueError as err:
            raise ConfigError(f"config: sampler.grid = 'scheduler' at sampler.steps = {s.steps}: "
                              f"{err}: take other sampler.steps, or one of piadm's own grids") \
                from None
    try:
        grid = make_grid(s.grid, s.steps, u_min=s.u_min, u_max=s.u_max, block_size=s.block_size,
                         knee=s.knee)
    except ValueError as err:  # steps too close for float64 to tell apart: a traceback before
        raise ConfigError(f"config: sampler.u_min = {s.u_min!r} to sampler.u_max = {s.u_max!r} "
                          f"in sampler.steps = {s.steps} on the {s.grid!r} grid: {err}: "
                          "widen the range or take fewer steps") from None
    process = getattr(getattr(model, "base", model), "process", None)
    if process is not None:  # a network's own schedule: never called past what it saw
        _check_within_schedule(s, trained_top(process),
                               getattr(model, "scheduler_u", None) is not None)
    return grid


def _check_within_schedule(s: SamplerConfig, top: float, has_scheduler: bool) -> None:
    """Refuse a grid whose first model call is past ``top``, the most noise the network was
    trained at (edm-heun's churn lifts that call above sampler.u_max); below the schedule's
    first timestep only a final denoising calls it, and a little extrapolation there is
    harmless."""
    lift = 1.0
    if s.method == CHURNS and s.churn > 0:
        from pipeline.samplers.highorder import churn_gamma

        lift = 1 + churn_gamma(s.churn, s.steps)
    first = math.log1p(math.expm1(s.u_max) * lift**2)  # sigma (1 + gamma), as u
    if first <= top * (1 + 1e-9):
        return
    allowed = math.floor(math.log1p(math.expm1(top) / lift**2) * 1e4) / 1e4
    raise ConfigError(
        f"config: sampler.u_max = {s.u_max:g} is past the most noise the network was trained "
        f"at: its schedule ends at u = {top:.6g}, so the {s.grid!r} grid would call it at "
        + ("times it never saw" if lift == 1 else
           f"times it never saw (sampler.churn lifts the first call to u = {first:.4g})")
        + f": set sampler.u_max = {allowed:g} or less"
        + (", or sampler.grid = 'scheduler' (the scheduler's own timesteps)"
           if has_scheduler else ""))


def residual_length(s: SamplerConfig) -> int:
    """Rounds of residual history a store keeps per member: none for the sequential samplers;
    otherwise at most one round per step (a sweep or a window advance settles at least one
    step). ``piadm-ode``'s corrector sweeps a fixed number of times and keeps no residual:
    stores made before this kept room for them (NaN), which their runs still fill alike."""
    entry = REGISTRY[s.method]
    return 0 if entry.reference == s.method else s.steps


def member_batches(members: int, batch_size: int) -> list[tuple[int, ...]]:
    """Consecutive member batches [(0..b-1), (b..2b-1), ...]; the last may be short."""
    return [tuple(range(a, min(a + batch_size, members))) for a in range(0, members, batch_size)]


@dataclass(frozen=True)
class Batch:
    """One sampled batch: fields (B, *shape), the member seeds (B,) that keyed their noise,
    and the sampler's stats."""

    fields: torch.Tensor
    seeds: tuple[int, ...]
    stats: Stats


def sample_batch(model, noise: Noise, *, method: str, grid: Grid, options: Options,
                 comm) -> Batch:
    """Sample the trajectories of ``noise`` (one per key (item, member), see ``Noise.members``)
    with ``method``; ``comm`` holds the time slices that share the Picard blocks. A NaN/Inf
    field raises: it is never written, never marked done."""
    y, stats = SAMPLERS[method](model, noise.prior(), grid, noise, comm=comm, options=options)
    check_finite(y, noise.keys, "by the end of sampling")
    return Batch(y, noise.member_seeds(), stats)


def model_digest(cfg: Config) -> str:
    """SHA-256 identifying the model: its checkpoint's bytes for a learned model (with its
    guide's and the guidance weight when guided), else its section (an exact model is defined
    by it; a plugin kind's code and files are recorded apart, ``MODEL_PLUGIN``)."""
    if cfg.model.kind == "module":
        from models.module import module_digest

        return module_digest(cfg.model)
    if cfg.model.kind == "diffusers":
        from models.pretrained import pretrained_digest

        return pretrained_digest(cfg.model)
    if cfg.model.checkpoint:
        from models.digest import files_digest  # each start asks more than once: read once

        if cfg.model.guide:  # the guided model is the pair and its weight
            return files_digest([cfg.model.checkpoint, cfg.model.guide],
                                repr(float(cfg.model.guidance)).encode())
        return files_digest([cfg.model.checkpoint])
    text = json.dumps(dataclasses.asdict(cfg.model), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def provenance(cfg: Config) -> dict:
    """Store attributes that say how the ensemble was made."""
    s = cfg.sampler
    return {
        "title": "piadm ensemble",
        "piadm_version": pipeline.__version__,
        "config": cfg.text,
        "config_sha256": cfg.digest,
        "sampler_method": s.method,
        "sampler_steps": s.steps,
        "sampler_block_size": s.block_size,
        "sampler_seed": s.seed,
        "sampler_noise": s.noise,
        "torch_version": torch.__version__,  # device noise depends on it
        "numpy_version": np.__version__,  # host noise: numpy's Philox and normal sampler
        HOST_NOISE: host_fingerprint(),  # and what they drew: a resume checks it
        "python_version": platform.python_version(),
        **{f"{name}_version": _installed(name) for name in ("zarr", "xarray", "mpi4py")},
        "sampler_revision": REGISTRY[s.method].revision,  # cached tolerances follow it too
        "model_kind": cfg.model.kind,
        "model_sha256": model_digest(cfg),
        **_network_provenance(cfg.model),
        "store_sha256": cfg.store_digest,
        "u_min": s.u_min,
        "denoised": int(s.denoise_final),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "made_in": os.getcwd(),  # where the config's relative paths start
    }


def _installed(name: str) -> str:
    """The installed version of distribution ``name``, or "" where it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


# the attribute of the hash of the file that defines a module model (models.module.source_digest)
MODEL_SOURCE = "model_source_sha256"
# the attribute of the hash of a fixed host noise draw (noise.host_fingerprint)
HOST_NOISE = "host_noise_sha256"
# the attribute of the hash of a checkpoint's sidecars (``sidecar_digest``)
MODEL_SIDECAR = "model_sidecar_sha256"
# the attribute of the hash of a plugin kind's package, code and files (models.plugin_digest):
# apart from model_sha256, so that a store made before it was recorded still resumes
MODEL_PLUGIN = "model_plugin_sha256"


# what a sidecar records of how its network was trained (``models.checkpoint``): it decides
# nothing a sample draws, so a store resumes after it is edited (training data moved, say)
SIDECAR_RECORD = ("data", "config", "step", "val_loss")
# the attribute of what the sidecars say that decides the members (``sidecar_says``), but
# their grids' coordinates (a list a point: large on large fields; the digest holds them)
MODEL_SIDECAR_SAYS = "model_sidecar"
SIDECAR_GRIDS = ("grid", "cond_grid")


def sidecar_says(m, whole: bool = False) -> list | None:
    """What the JSON sidecars of a U-Net's checkpoint and its guide (None where none) say of
    the network: its fields' scaling, data bound S and architecture, which ``models.export
    --data`` changes without the weights; ``whole``: their training record too
    (``SIDECAR_RECORD``). None for other models."""
    if m.kind != "unet" or not m.checkpoint:
        return None
    from models.checkpoint import sidecar

    said = []
    for path in (m.checkpoint, m.guide):
        try:
            said.append(json.loads(sidecar(Path(path)).read_text()) if path else None)
        except (OSError, ValueError):  # loading the model names an unreadable sidecar
            said.append(None)
    return said if whole else [{k: v for k, v in one.items() if k not in SIDECAR_RECORD}
                               if isinstance(one, dict) else one for one in said]


def sidecar_digest(m, whole: bool = False) -> str:
    """SHA-256 of ``sidecar_says`` as sorted JSON (a file written anew with the same content
    is the same); ``whole``: of the sidecars whole, as piadm recorded it before 2026-12-07;
    "" for other models."""
    said = sidecar_says(m, whole)
    return "" if said is None else hashlib.sha256(
        json.dumps(said, sort_keys=True).encode()).hexdigest()


def _network_provenance(m) -> dict:
    """What a brought network was: its factory or folder, and what it predicts on which
    process; a U-Net checkpoint's own are in its sidecar, whose hash is recorded (its
    weights' in model_sha256)."""
    if m.kind == "module":
        from models.module import source_digest

        return {"model_target": m.target, "model_weights": str(m.weights or ""),
                "model_prediction": m.prediction, "model_process": m.process,
                MODEL_SOURCE: source_digest(m)}
    if m.kind == "diffusers":
        from models.pretrained import describe

        return {"model_path": m.path, **describe(m)}
    if m.kind == "unet":
        said = [{k: v for k, v in one.items() if k not in SIDECAR_GRIDS}
                if isinstance(one, dict) else one for one in sidecar_says(m)]
        return {MODEL_SIDECAR: sidecar_digest(m),
                MODEL_SIDECAR_SAYS: json.dumps(said, sort_keys=True)}
    from models import MODELS, plugin_digest

    return {} if m.kind in MODELS else {MODEL_PLUGIN: plugin_digest(m)}

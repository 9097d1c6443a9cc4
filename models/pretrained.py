"""``model.kind = "diffusers"``: a network and its scheduler from a ``save_pretrained`` folder.

``model.path`` holds either a pipeline (``model_index.json`` with ``unet/`` or ``transformer/``
and ``scheduler/`` folders) or one model's ``config.json`` beside a ``scheduler_config.json``.
The scheduler config says what the network predicts (``prediction_type``) and on which DDPM
schedule (``beta_schedule``, ``beta_start``, ``beta_end``, ``num_train_timesteps``, or
``trained_betas``); its noise levels are computed as diffusers computes them, so the network
sees exactly the timesteps it was trained on. ``sampler.grid = "scheduler"`` samples on the
scheduler's own timesteps (its ``set_timesteps``) and ends where its last step ends.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from models.digest import files_digest
from models.module import NetworkModel, _Net, check_output
from pipeline.clock import DiscreteVP, ddpm_alphas_cumprod
from pipeline.errors import ConfigError

# diffusers' prediction_type -> models.adapters' prediction
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# diffusers' beta_schedule -> pipeline.clock's
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                  "squaredcos_cap_v2": "cosine"}
WEIGHT_FILES = ("*.safetensors", "*.bin")


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise ConfigError("config: model.kind = 'diffusers' needs the diffusers package: pip "
                          "install 'piadm[diffusers]' (or pip install diffusers)") from None
    return diffusers


def layout(path: str) -> tuple[Path, Path]:
    """(model folder, scheduler folder) of a save_pretrained folder; one-line errors."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"config: model.path = {path!r} is not a folder: point it at a folder "
                          "written by save_pretrained (a pipeline, or a model with its scheduler)")
    if (root / "model_index.json").is_file():
        model = next((root / n for n in ("unet", "transformer") if (root / n).is_dir()), None)
        if model is None:
            raise ConfigError(f"config: model.path = {path!r} is a pipeline without a unet/ or "
                              "transformer/ folder")
        scheduler = root / "scheduler"
    else:
        model, scheduler = root, root
    if not (model / "config.json").is_file():
        raise ConfigError(f"config: model.path = {path!r} has no model config.json in {model}: "
                          "save the model there with save_pretrained")
    if not (scheduler / "scheduler_config.json").is_file():
        raise ConfigError(f"config: model.path = {path!r} has no scheduler_config.json in "
                          f"{scheduler}: save the scheduler it was trained with there too "
                          "(scheduler.save_pretrained(folder))")
    return model, scheduler


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"config: model.path: {path} is not readable JSON ({err})") from None


def schedule_of(scheduler_config: dict, where: str) -> tuple[str, tuple[float, ...]]:
    """(prediction, alpha_bar per training timestep) that a scheduler config describes."""
    kind = scheduler_config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ConfigError(f"config: model.path: {where} has prediction_type = {kind!r}, which "
                          f"piadm does not know: it reads {', '.join(PREDICTION_TYPES)}")
    if scheduler_config.get("rescale_betas_zero_snr"):  # alpha_bar 0 at the last timestep
        raise ConfigError(f"config: model.path: {where} has rescale_betas_zero_snr = true: a "
                          "zero-terminal-SNR schedule reaches pure noise, which piadm's clock "
                          "(u = -log alpha_bar) cannot start from; use a network trained on "
                          "another schedule")
    steps = int(scheduler_config.get("num_train_timesteps", 1000))
    trained = scheduler_config.get("trained_betas")
    if trained:
        betas = torch.tensor(trained, dtype=torch.float32)
        return PREDICTION_TYPES[kind], tuple(torch.cumprod(1.0 - betas, 0).double().tolist())
    schedule = scheduler_config.get("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES:
        raise ConfigError(f"config: model.path: {where} has beta_schedule = {schedule!r}, which "
                          f"piadm does not map: it reads {', '.join(BETA_SCHEDULES)}")
    table = ddpm_alphas_cumprod(BETA_SCHEDULES[schedule],
                                float(scheduler_config.get("beta_start", 1e-4)),
                                float(scheduler_config.get("beta_end", 0.02)), steps)
    return PREDICTION_TYPES[kind], table


def scheduler_grid(scheduler_dir: Path, process: DiscreteVP):
    """steps -> the OU clock (steps + 1,) at the scheduler's own timesteps for ``steps``
    inference steps, then where its last step lands (the clean end, or its final alpha_bar)."""

    def grid(steps: int) -> torch.Tensor:
        diffusers = _diffusers()
        config = _read(scheduler_dir / "scheduler_config.json")
        cls = getattr(diffusers, config.get("_class_name", "DDPMScheduler"), None)
        if cls is None:
            raise ConfigError(f"config: sampler.grid = 'scheduler': diffusers has no scheduler "
                              f"{config.get('_class_name')!r}")
        scheduler = cls.from_pretrained(scheduler_dir)
        try:
            scheduler.set_timesteps(steps)
        except ValueError as err:  # e.g. more steps than it was trained with
            first = (str(err).strip().splitlines() or [""])[0][:160]
            raise ConfigError(
                f"config: sampler.steps = {steps} does not fit the scheduler in {scheduler_dir} "
                f"({cls.__name__}: {first}): with sampler.grid = 'scheduler' take at most its "
                f"num_train_timesteps = {config.get('num_train_timesteps', 1000)} steps, or "
                "set sampler.grid to one of piadm's own grids") from None
        t = scheduler.timesteps.to(torch.float64)
        table = process.table()
        # a timestep between two of the table's (EulerDiscrete's 832.5): its sigma as the
        # scheduler interpolates it, linearly in t
        sigma = torch.sqrt(torch.expm1(table))
        at = torch.from_numpy(np.interp(t.numpy(), np.arange(len(table)), sigma.numpy()))
        final = float(getattr(scheduler, "final_alpha_cumprod", torch.tensor(1.0)))
        end = (-torch.log(torch.tensor([final], dtype=torch.float64))).clamp(min=0.0)
        levels = torch.log1p(at**2)
        if float(end[0]) >= float(levels[-1]) * (1 - 1e-9):  # its last step would not move
            raise ConfigError(
                f"config: sampler.grid = 'scheduler': {cls.__name__} in {scheduler_dir} ends at "
                "its last timestep's own noise level (its final alpha_bar is alpha_bar at "
                f"t = {int(t[-1])}: set_alpha_to_one = false with steps_offset = 0), so its "
                "last step does not move: set steps_offset = 1 or set_alpha_to_one = true in "
                "its scheduler_config.json, or use one of piadm's own grids")
        return torch.cat([levels, end])

    return grid


def load_pretrained(section, device="cpu") -> NetworkModel:
    """The ``model.kind = "diffusers"`` model of a validated ``[model]`` section."""
    model_dir, scheduler_dir = layout(section.path)
    config = _read(model_dir / "config.json")
    scheduler = _read(scheduler_dir / "scheduler_config.json")
    prediction, table = schedule_of(scheduler, str(scheduler_dir / "scheduler_config.json"))
    diffusers = _diffusers()
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None:
        raise ConfigError(f"config: model.path = {section.path!r}: diffusers has no model class "
                          f"{config.get('_class_name')!r} (from {model_dir / 'config.json'})")
    # its advice on optional packages is noise here, and so is its error-level line for a
    # folder of .bin weights (it looks for .safetensors first): a failure raises, said below
    diffusers.utils.logging.set_verbosity(diffusers.utils.logging.CRITICAL)
    try:
        net = cls.from_pretrained(model_dir)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ConfigError(f"config: model.path = {section.path!r}: {cls.__name__} does not load "
                          f"({type(err).__name__}: {first}): save the trained model there "
                          "with save_pretrained (its config.json and weights)") from None
    net.to(device).eval()
    # a one-channel network on a 2-D field: the channel axis is added around each call
    channel = len(section.shape) == 2 and config.get("in_channels") == 1
    process = DiscreteVP(num_steps=len(table), alphas_cumprod=table)
    _warn_unapplied(scheduler, section.path)
    variance = scheduler.get("variance_type") in ("learned", "learned_range")
    model = NetworkModel(_Net(net, channel, variance), tuple(section.shape), process, prediction,
                         scheduler_u=scheduler_grid(scheduler_dir, process))
    if section.condition == "none":
        check_output(model, tuple(section.shape), f"model.path = {section.path!r}")
    return model


def _warn_unapplied(scheduler: dict, path: str) -> None:
    """Warn of the scheduler settings piadm's samplers do not apply, whose loop the sequential
    samplers then are not: clipping and thresholding of x0, and an SDE step variance other
    than the posterior's (``fixed_large``: 7.6e-4 from the DDPM loop, where it agrees to
    1e-12 otherwise)."""
    said = []
    if scheduler.get("clip_sample"):
        bound = scheduler.get("clip_sample_range", 1.0)
        said.append(f"clip_sample = true (x0 clipped to +-{bound})")
    if scheduler.get("thresholding"):
        said.append("thresholding = true")
    kind = scheduler.get("variance_type")
    if kind and kind not in ("fixed_small", "learned", "learned_range"):
        said.append(f"variance_type = {kind!r} (piadm's SDE steps take the posterior variance, "
                    "diffusers' 'fixed_small')")
    if said:
        warnings.warn(f"model.path = {path!r}: its scheduler's {'; '.join(said)} not applied: "
                      "piadm samples the network's own prediction, so its members differ from "
                      "that scheduler's pipeline", stacklevel=2)


# Files that mark a folder as another tool's output, not part of a network: a Zarr store (an
# ensemble written into the model's folder), an evaluation's folder
OUTPUT_MARKS = ("zarr.json", ".zgroup", ".zarray", ".piadm-evaluate")


def pretrained_digest(section) -> str:
    """SHA-256 of the folder's weight files and configs (sorted by path), but those inside a
    Zarr store or an evaluation's folder within it: a store written into the model's folder
    changed the digest at its first run, and could never be resumed."""
    root = Path(section.path)
    files = sorted(p for pattern in (*WEIGHT_FILES, "*.json") for p in root.rglob(pattern)
                   if not _in_output(p, root))
    return files_digest(files)


def _in_output(path: Path, root: Path) -> bool:
    """Whether ``path`` lies in a folder under ``root`` that another tool's output marks."""
    return any((folder / mark).exists() for folder in path.parents
               if folder != root and root in folder.parents for mark in OUTPUT_MARKS)


def describe(section) -> dict:
    """Store attributes for a folder: what it predicts, and its schedule."""
    _, scheduler_dir = layout(section.path)
    config = _read(scheduler_dir / "scheduler_config.json")
    return {"model_prediction": PREDICTION_TYPES.get(config.get("prediction_type", "epsilon")),
            "model_process": f"ddpm {config.get('beta_schedule', 'linear')} "
                             f"{config.get('num_train_timesteps', 1000)} steps",
            "model_scheduler": config.get("_class_name", "")}

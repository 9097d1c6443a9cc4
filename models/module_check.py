"""One-line checks of a bring-your-own network's ``[model]`` keys (``model.kind =
"module"``, ``models/module.py``), importing no torch, so that ``piadm config`` stays quick."""
from __future__ import annotations

from pipeline.choices import BETA_SCHEDULES, INPUT_SCALES, PREDICTIONS, PROCESSES
from pipeline.errors import ConfigError


def check_section(section) -> None:
    """One-line errors for the keys a module model needs, before anything is imported."""
    module, _, name = section.target.partition(":")
    if section.target.count(":") != 1 or not module.strip() or not name.strip():
        raise ConfigError(f"config: model.target = {section.target!r} must name a factory as "
                          "'package.module:function' (a callable returning a torch.nn.Module)")
    if section.prediction not in PREDICTIONS:
        raise ConfigError(f"config: model.prediction = {section.prediction!r} is unknown: use "
                          f"one of {', '.join(PREDICTIONS)} (what the network outputs)")
    if section.process not in PROCESSES:
        raise ConfigError(f"config: model.process = {section.process!r} is unknown: use one of "
                          f"{', '.join(PROCESSES)} (the forward process it was trained on)")
    if section.process == "ddpm" and section.beta_schedule not in BETA_SCHEDULES:
        raise ConfigError(f"config: model.beta_schedule = {section.beta_schedule!r} is unknown: "
                          f"use one of {', '.join(BETA_SCHEDULES)}")
    if section.process == "ddpm":
        _check_ddpm_schedule(section)
    if section.input_scale not in INPUT_SCALES:
        raise ConfigError(f"config: model.input_scale = {section.input_scale!r}: use 'native' "
                          "(the process's own state) or 'unit' (scaled to unit variance)")
    if section.weights and not isinstance(section.weights, str):
        raise ConfigError("config: model.weights must be a file path for model.kind = 'module'")


# DDPM trains on 1000 timesteps, improved DDPM on 4000; the schedule's tables hold a few floats
# a timestep, so 1e9 of them took every byte of the host before a word was said
MOST_TRAIN_STEPS = 100_000


def _check_ddpm_schedule(section) -> None:
    """The DDPM schedule a module network was trained on: a noise level per timestep that
    rises and never reaches one (else a clean signal fraction of zero or less, and NaN)."""
    if not (isinstance(section.train_steps, int)
            and 1 <= section.train_steps <= MOST_TRAIN_STEPS):
        raise ConfigError(f"config: model.train_steps = {section.train_steps!r} must be a whole "
                          f"number in [1, {MOST_TRAIN_STEPS}] (the timesteps of the schedule the "
                          "network was trained on, e.g. 1000)")
    if not 0 < section.beta_start <= section.beta_end < 1:
        raise ConfigError(f"config: model.beta_start = {section.beta_start} and model.beta_end = "
                          f"{section.beta_end} must satisfy 0 < beta_start <= beta_end < 1 "
                          "(DDPM's are 1e-4 and 0.02)")

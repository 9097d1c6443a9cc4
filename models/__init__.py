"""Score models behind one contract (``models.contract``): exact Gaussian models and adapters.

``MODELS`` maps ``model.kind`` to a builder taking the model section of the configuration and
the torch device the sampler runs on.
"""
from __future__ import annotations

import torch

from models.emulate import Emulated
from models.gmm import GaussianMixture, weight_error
from models.grf import GaussianRandomField, spectrum_error
from models.learned import load_unet
from models.module import load_module
from models.pretrained import load_pretrained

MODELS = {
    "grf": lambda c, device: GaussianRandomField(tuple(c.shape), slope=c.slope, length=c.length,
                                                 device=device),
    # a small exact model: its float64 parameters stay on the CPU whatever the device
    "gmm": lambda c, device: GaussianMixture.random(
        tuple(c.shape), components=c.components, spread=c.spread, std=c.std, seed=c.seed,
        weights=list(c.weights) or None,
    ),
    "unet": lambda c, device: load_unet(c.checkpoint, tuple(c.shape), device, c.guide,
                                        c.guidance),
    "module": load_module,  # bring your own network: model.target (models/module.py)
    "diffusers": load_pretrained,  # a diffusers save_pretrained folder (models/pretrained.py)
}

# Error of an ensemble's statistics against the model's exact target:
# STAT_ERRORS[kind](model, x (B, *shape), u_min, denoised) -> float.
STAT_ERRORS = {"grf": spectrum_error, "gmm": weight_error}


def plugin_kinds() -> dict:
    """model.kind -> builder(section, device) that installed packages register in the
    entry-point group ``piadm.models`` (their [model] keys piadm does not know come in
    ``section.args``)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="piadm.models") if ep.name not in MODELS}


def model_kinds() -> list[str]:
    """Every model.kind this installation can build."""
    return [*MODELS, *plugin_kinds()]


def build_model(section, device="cpu"):
    """The score model of a validated model section (``pipeline.settings.ModelConfig``), its
    tensors on ``device`` (the device of the states it will be called with); with
    ``emulate_ms = [latency, per_item]`` its calls take as long as an emulated accelerator's."""
    builder = MODELS.get(section.kind)
    if builder is None:
        builder = _plugin(section.kind)
    model = builder(section, torch.device(device))
    if section.emulate_ms:
        model = Emulated(model, *section.emulate_ms)
    return model


def _plugin(kind: str):
    from pipeline.errors import ConfigError

    entry = plugin_kinds().get(kind)
    if entry is None:
        raise ConfigError(f"config: model.kind = {kind!r} is unknown: use one of "
                          f"{', '.join(model_kinds())}")
    try:
        return entry.load()
    except Exception as err:
        raise ConfigError(f"config: model.kind = {kind!r}: its entry point {entry.value!r} does "
                          f"not load ({type(err).__name__}: {err})") from None

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

MODELS = {
    "grf": lambda c, device: GaussianRandomField(tuple(c.shape), slope=c.slope, length=c.length,
                                                 device=device),
    # a small exact model: its float64 parameters stay on the CPU whatever the device
    "gmm": lambda c, device: GaussianMixture.random(
        tuple(c.shape), components=c.components, spread=c.spread, std=c.std, seed=c.seed,
        weights=list(c.weights) or None,
    ),
    "unet": lambda c, device: load_unet(c.checkpoint, tuple(c.shape), device),
}

# Error of an ensemble's statistics against the model's exact target:
# STAT_ERRORS[kind](model, x (B, *shape), u_min, denoised) -> float.
STAT_ERRORS = {"grf": spectrum_error, "gmm": weight_error}


def build_model(section, device="cpu"):
    """The score model of a validated model section (``pipeline.config.ModelConfig``), its
    tensors on ``device`` (the device of the states it will be called with); with
    ``emulate_ms = [latency, per_item]`` its calls take as long as an emulated accelerator's."""
    model = MODELS[section.kind](section, torch.device(device))
    if section.emulate_ms:
        model = Emulated(model, *section.emulate_ms)
    return model

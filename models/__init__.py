"""Score models behind one contract (``models.contract``): exact Gaussian models and adapters.

``MODELS`` maps ``model.kind`` to a builder taking the model section of the configuration.
"""
from __future__ import annotations

from models.gmm import GaussianMixture, weight_error
from models.grf import GaussianRandomField, spectrum_error
from models.learned import load_unet

MODELS = {
    "grf": lambda c: GaussianRandomField(tuple(c.shape), slope=c.slope, length=c.length),
    "gmm": lambda c: GaussianMixture.random(
        tuple(c.shape), components=c.components, spread=c.spread, std=c.std, seed=c.seed,
        weights=list(c.weights) or None,
    ),
    "unet": lambda c: load_unet(c.checkpoint, tuple(c.shape)),
}

# Error of an ensemble's statistics against the model's exact target:
# STAT_ERRORS[kind](model, x (B, *shape), u_min, denoised) -> float.
STAT_ERRORS = {"grf": spectrum_error, "gmm": weight_error}


def build_model(section):
    """The score model of a validated model section (``pipeline.config.ModelConfig``)."""
    return MODELS[section.kind](section)

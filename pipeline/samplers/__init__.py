"""Samplers sharing one signature:

    sample(model, y0, grid, noise, *, comm, options) -> (y, Stats)

with y0 and y (B, *shape) tensors, ``grid`` a ``pipeline.grids.Grid``, ``noise`` a
``pipeline.noise.Noise`` for the batch, ``comm`` a communicator (``pipeline.comm``) and
``options`` a ``pipeline.samplers.options.Options``.
"""
from __future__ import annotations

from pipeline.samplers.options import Options, PicardDivergence, Stats
from pipeline.samplers import pcwindow, window
from pipeline.samplers.pcwindow import pc_window_ode, pc_window_sde
from pipeline.samplers.picard import piadm_ode, piadm_sde
from pipeline.samplers.sequential import sequential_ode, sequential_sde
from pipeline.samplers.window import window_ode, window_sde

SAMPLERS = {
    "sequential-sde": sequential_sde,
    "sequential-ode": sequential_ode,
    "piadm-sde": piadm_sde,
    "piadm-ode": piadm_ode,
    "window": window_sde,
    "window-ode": window_ode,
    "pc-window": pc_window_sde,
    "pc-window-ode": pc_window_ode,
}

# The sequential sampler whose path a parallel sampler reproduces with the same noise.
REFERENCE = {
    "sequential-sde": "sequential-sde",
    "sequential-ode": "sequential-ode",
    "piadm-sde": "sequential-sde",
    "piadm-ode": "sequential-ode",
    "window": "sequential-sde",
    "window-ode": "sequential-ode",
    "pc-window": "sequential-sde",
    "pc-window-ode": "sequential-ode",
}

# Sliding-window samplers: they need sampler.tol, and their window's default length p.
WINDOWED = {
    "window": window.DEFAULT_WINDOW,
    "window-ode": window.DEFAULT_WINDOW,
    "pc-window": pcwindow.DEFAULT_WINDOW,
    "pc-window-ode": pcwindow.DEFAULT_WINDOW,
}

__all__ = ["WINDOWED", "SAMPLERS", "REFERENCE", "Options", "Stats", "PicardDivergence"]

"""The one model contract every sampler calls.

A score model is any callable ``model(x, u) -> score`` with

- ``x``: tensor (B, *shape), a batch of VP states;
- ``u``: tensor (B,), the OU clock of each state (docs/algorithms.md section 1), same dtype as x;
- returns the score of the VP marginal at u, tensor (B, *shape), same dtype and device as x.

Exact models implement it directly; learned networks are wrapped by ``models.adapters``.
Networks know nothing about samplers, and samplers know nothing about parameterisations.
"""
from __future__ import annotations

from typing import Protocol

import torch


class ScoreModel(Protocol):
    """Score of the VP marginal at OU clock u: (B, *shape), (B,) -> (B, *shape)."""

    shape: tuple[int, ...]

    def __call__(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor: ...

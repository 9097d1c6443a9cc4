"""Conditioning an exact model on an input field.

``MeanShift(base, mean)``: the data are ``mean + z`` with z drawn from ``base``. The VP state
at clock u is then a(u) mean + (a z + s eps), so the score is exact:
score(x, u) = base_score(x - a(u) mean, u), with a = e^{-u/2}.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MeanShift:
    """``base`` (a score model) shifted to mean ``mean`` (*shape)."""

    base: object
    mean: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def data_bound(self) -> float:
        """S: a shift leaves the data covariance, and so its bound, as it was."""
        return float(getattr(self.base, "data_bound", float("inf")))

    def __call__(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Exact score at (x (B, *shape), u (B,))."""
        a = torch.exp(-0.5 * u).reshape(-1, *(1,) * (x.dim() - 1))
        return self.base(x - a * self.mean.to(x.device, x.dtype), u)


def upsample_blocks(coarse: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A coarse field (h, w) repeated over blocks to the grid ``shape`` (H, W): (H, W)."""
    fy, fx = shape[0] // coarse.shape[-2], shape[1] // coarse.shape[-1]
    return coarse.repeat_interleave(fy, -2).repeat_interleave(fx, -1)


# model.condition -> how an item's input field (model units) binds a model: "mean" for the
# exact models (the field is the ensemble mean, of the model's shape), "coarse" for a
# conditional U-Net (a block-averaged field, upsampled inside).
CONDITIONS = {"mean": MeanShift, "coarse": lambda model, field: model.conditioned(field)}

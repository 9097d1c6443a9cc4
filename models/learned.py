"""Trained U-Net checkpoints (``pipeline.train``) as score models on the OU clock."""
from __future__ import annotations

import torch

from models.adapters import NetworkAdapter
from pipeline.clock import VE


def unet_score_model(den, shape: tuple[int, ...], cond: torch.Tensor | None = None) -> NetworkAdapter:
    """The score of EDM denoiser ``den`` (x0 prediction in the VE convention) on fields of
    ``shape``, in the normalised units it was trained in; ``cond`` (1, H, W) binds a
    conditioning field for every call."""

    @torch.no_grad()
    def net(x_native: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c = None if cond is None else cond[None].expand(x_native.shape[0], *cond.shape)
        return den(x_native.float(), sigma.float(), c).to(x_native.dtype)

    return NetworkAdapter(net, VE(), "x0", tuple(shape))

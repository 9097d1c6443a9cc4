"""Conditioning a model on an input field.

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
        """The field shape, the base model's."""
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
    fy, fx = shape[-2] // coarse.shape[-2], shape[-1] // coarse.shape[-1]
    return coarse.repeat_interleave(fy, -2).repeat_interleave(fx, -1)


def spectral_upsample(coarse: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The smooth periodic field whose block averages best explain ``coarse``: (..., h, w) ->
    (..., H, W).

    A block average over f points is a box filter (gain sin(pi k f/H) / (f sin(pi k/H)), and a
    shift of (f - 1)/2 points) followed by subsampling, so every mode the coarse grid resolves
    (|k| < h/2 per axis) is divided by that filter and the rest are zero. The Nyquist modes are
    dropped: their phase is ambiguous. What is left to a model is the fine field minus this,
    mostly the scales the coarse grid cannot hold.
    """
    big, small = tuple(shape[-2:]), tuple(coarse.shape[-2:])
    spec = torch.fft.fft2(coarse.double())
    on = coarse.device  # every table beside the field: a GPU's product takes no host tensor
    for axis, (n, m) in enumerate(zip(big, small)):
        f = n // m
        k = torch.fft.fftfreq(m, 1 / m, dtype=torch.float64, device=on)
        gain = torch.where(k == 0, torch.ones_like(k),
                           torch.sin(torch.pi * k * f / n) / (f * torch.sin(torch.pi * k / n)))
        kept = (k.abs() < m / 2) / (gain * torch.exp(1j * torch.pi * k * (f - 1) / n))
        spec = spec * kept.reshape((-1, 1) if axis == 0 else (1, -1))
    rows = torch.fft.fftfreq(small[0], 1 / small[0], device=on).long() % big[0]
    cols = torch.fft.fftfreq(small[1], 1 / small[1], device=on).long() % big[1]
    full = spec.new_zeros(coarse.shape[:-2] + big)
    full[..., rows[:, None], cols[None, :]] = spec * (big[0] * big[1] / (small[0] * small[1]))
    return torch.fft.ifft2(full).real.to(coarse.dtype)


# model.condition -> how an item's input field (model units) binds a model: "mean" for the
# exact models (the field is the ensemble mean, of the model's shape), "coarse" for a
# conditional U-Net (a block-averaged field, upsampled inside).
CONDITIONS = {"mean": MeanShift, "coarse": lambda model, field: model.conditioned(field)}

"""Stationary Gaussian random field on a periodic grid, with its exact score at every u.

Data: x_0 = F^{-1} (sqrt(lambda) F z) on a periodic 1-, 2- or 3-D grid, F the orthonormal FFT,
with the power-law spectrum lambda(k) proportional to (1 + (|k| ell / 2 pi)^2)^(-slope/2),
scaled so that the mean per-point variance is 1. The VP marginal at OU clock u is Gaussian
with spectrum a^2 lambda + s^2 (a = e^{-u/2}, s^2 = 1 - e^{-u}), so its score is diagonal in
Fourier space: score(x, u) = -F^{-1} ( F x / (a^2 lambda + s^2) ). Cost O(d log d) per field,
memory a few fields, so 10^7 points work.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.fourier import half_weights


def wavenumbers(shape: tuple[int, ...]) -> torch.Tensor:
    """|k| in cycles per domain on the rfftn half-grid, float64 of shape rfft_shape(shape)."""
    axes = [torch.fft.fftfreq(n, 1 / n, dtype=torch.float64) for n in shape[:-1]]
    axes.append(torch.fft.rfftfreq(shape[-1], 1 / shape[-1], dtype=torch.float64))
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.sqrt(sum(g**2 for g in grids))


@dataclass(frozen=True)
class GaussianRandomField:
    """Exact score model (``models.contract``) of a periodic power-law Gaussian field."""

    shape: tuple[int, ...]
    slope: float = 3.0
    length: float = 8.0
    device: torch.device | str = field(default="cpu", repr=False, compare=False)
    spectrum: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not 1 <= len(self.shape) <= 3 or min(self.shape) < 2:
            raise ValueError(f"grf shape must have 1 to 3 dims, each >= 2; got {self.shape}")
        k = wavenumbers(self.shape)
        lam = (1 + (k * self.length / (2 * math.pi)) ** 2) ** (-self.slope / 2)
        weights = half_weights(self.shape)
        lam = lam * (weights.sum() / (lam * weights).sum())  # mean per-point variance 1
        object.__setattr__(self, "spectrum", lam.to(self.device))

    @property
    def data_bound(self) -> float:
        """S: the largest eigenvalue of the data covariance (its largest mode variance)."""
        return float(self.spectrum.max())

    @property
    def dims(self) -> tuple[int, ...]:
        """The field's axes counted from the end (-2, -1 in 2-D), for the FFTs."""
        return tuple(range(-len(self.shape), 0))

    def marginal_spectrum(self, u: float) -> torch.Tensor:
        """Per-mode variance of the VP marginal at u, float64 of the rfft half-grid shape."""
        return math.exp(-u) * self.spectrum - math.expm1(-u)

    def __call__(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Exact score at (x (B, *shape), u (B,)), x on the model's device."""
        xf = torch.fft.rfftn(x, dim=self.dims, norm="ortho")
        a2 = torch.exp(-u.to(torch.float64)).reshape(-1, *(1,) * len(self.shape))
        var = (a2 * self.spectrum - torch.expm1(-u.to(torch.float64)).reshape(a2.shape))
        score_f = -xf / var.to(x.dtype)
        return torch.fft.irfftn(score_f, s=self.shape, dim=self.dims, norm="ortho")

    def sample(self, n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
        """n exact draws from the data distribution, (n, *shape)."""
        z = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, *self.shape)))
        zf = torch.fft.rfftn(z, dim=self.dims, norm="ortho")
        x = torch.fft.irfftn(zf * self.spectrum.cpu().sqrt(), s=self.shape, dim=self.dims, norm="ortho")
        return x.to(dtype)


def radial_spectrum(x: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Radially binned variance spectrum of fields x (B, *shape) over the last ``ndim`` dims.

    Returns (k (K,), power (K,)): shell k = round(|k|) for k = 1 .. min(shape)//2, power the
    mean of |F x|^2 (orthonormal FFT) over the members and the shell's modes.
    """
    shape = tuple(x.shape[-ndim:])
    dims = tuple(range(-ndim, 0))
    power = torch.fft.rfftn(x.to(torch.float64), dim=dims, norm="ortho").abs() ** 2
    return _shell_mean(power.mean(0), shape)


def _shell_mean(values: torch.Tensor, shape: tuple[int, ...]):
    shell = torch.round(wavenumbers(shape)).long()
    weights = half_weights(shape)
    kmax = min(shape) // 2
    inside = (shell <= kmax).flatten()
    index = shell.flatten()[inside]
    num = torch.zeros(kmax + 1, dtype=torch.float64).index_add_(
        0, index, (values * weights).flatten()[inside])
    den = torch.zeros(kmax + 1, dtype=torch.float64).index_add_(0, index, weights.flatten()[inside])
    k = torch.arange(1, kmax + 1)
    return k, num[1:] / den[1:]


def target_spectrum(model: GaussianRandomField, u: float, denoised: bool) -> torch.Tensor:
    """Exact per-mode variance of the sampler's target at clock u (rfft half-grid).

    The VP marginal a^2 lambda + s^2, or for the Tweedie mean E[x_0 | x_u] of a Gaussian,
    a^2 lambda^2 / (a^2 lambda + s^2)."""
    marg = model.marginal_spectrum(u)
    return math.exp(-u) * model.spectrum**2 / marg if denoised else marg


def spectrum_error(model: GaussianRandomField, x: torch.Tensor, u: float,
                   denoised: bool = False) -> float:
    """Mean over shells of |binned spectrum of x / exact target - 1| (x (B, *shape))."""
    _, est = radial_spectrum(x.cpu(), len(model.shape))
    _, true = _shell_mean(target_spectrum(model, u, denoised).cpu(), model.shape)
    return float((est / true - 1).abs().mean())

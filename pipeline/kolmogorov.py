"""2-D incompressible Navier-Stokes in vorticity form on the periodic square [0, 2 pi)^2,
pseudo-spectral with 2/3 dealiasing and an integrating-factor RK4 step (torch, any device).

    d omega / dt + u . grad omega = nu lap omega - alpha omega + f,   u = (d psi/dy, -d psi/dx),
    lap psi = -omega,   f = -k_f cos(k_f y)  (Kolmogorov forcing: the curl of (sin(k_f y), 0)).

The linear terms are integrated exactly (integrating factor), so the step is limited only by
advection: dt <= cfl * dx / max |u|. Without forcing and drag, a Taylor-Green vortex
omega = 2 k cos(k x) cos(k y) is an exact solution that decays like exp(-2 nu k^2 t)
(its nonlinear term vanishes), which the tests use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.choices import resolved_wavenumber
from pipeline.errors import BlowUp


@dataclass(frozen=True)
class Flow:
    """The equation on an n x n grid: viscosity ``nu``, linear drag ``drag``, forcing
    wavenumber ``k_f`` and amplitude ``forcing`` (0 turns it off). No defaults: the
    ``[data]`` settings hold them (``DataConfig``)."""

    n: int
    nu: float
    drag: float
    k_f: int
    forcing: float


class Spectral:
    """Wavenumbers, dealiasing mask and the forcing of ``flow`` on ``device`` (float64)."""

    def __init__(self, flow: Flow, device="cpu"):
        n = flow.n
        k = torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64, device=device)
        kr = torch.fft.rfftfreq(n, 1.0 / n, dtype=torch.float64, device=device)
        self.ky, self.kx = torch.meshgrid(k, kr, indexing="ij")
        self.k2 = self.kx**2 + self.ky**2
        self.inv_k2 = torch.where(self.k2 > 0, 1.0 / self.k2.clamp(min=1e-30), torch.zeros_like(self.k2))
        cut = resolved_wavenumber(n)
        self.dealias = ((self.kx.abs() <= cut) & (self.ky.abs() <= cut)).to(torch.float64)
        self.linear = -flow.nu * self.k2 - flow.drag
        y = torch.arange(n, dtype=torch.float64, device=device) * (2 * math.pi / n)
        f = -flow.forcing * flow.k_f * torch.cos(flow.k_f * y)[:, None].expand(n, n)
        self.force_hat = torch.fft.rfft2(f)
        self.n = n

    def velocity(self, w_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocity (u, v) on the grid from vorticity coefficients (..., n, n//2+1)."""
        psi_hat = w_hat * self.inv_k2
        u = torch.fft.irfft2(1j * self.ky * psi_hat, s=(self.n, self.n))
        v = torch.fft.irfft2(-1j * self.kx * psi_hat, s=(self.n, self.n))
        return u, v

    def tendency(self, w_hat: torch.Tensor) -> torch.Tensor:
        """Nonlinear and forcing terms -u . grad omega + f, in Fourier space, dealiased:
        w_hat (..., n, n // 2 + 1) complex -> the same shape."""
        u, v = self.velocity(w_hat)
        wx = torch.fft.irfft2(1j * self.kx * w_hat, s=(self.n, self.n))
        wy = torch.fft.irfft2(1j * self.ky * w_hat, s=(self.n, self.n))
        return -torch.fft.rfft2(u * wx + v * wy) * self.dealias + self.force_hat


def step(sp: Spectral, w_hat: torch.Tensor, dt: float) -> torch.Tensor:
    """One integrating-factor RK4 step of size dt: (..., n, n//2+1) -> same."""
    e2, e = torch.exp(sp.linear * dt / 2), torch.exp(sp.linear * dt)
    k1 = sp.tendency(w_hat)
    k2 = sp.tendency(e2 * (w_hat + dt / 2 * k1))
    k3 = sp.tendency(e2 * w_hat + dt / 2 * k2)
    k4 = sp.tendency(e * w_hat + dt * e2 * k3)
    return e * w_hat + dt / 6 * (e * k1 + 2 * e2 * (k2 + k3) + k4)


def stable_dt(sp: Spectral, w_hat: torch.Tensor, cfl: float, dt_max: float) -> float:
    """The advective time step limit cfl * dx / max|u|, capped at dt_max; w_hat
    (..., n, n // 2 + 1) complex."""
    u, v = sp.velocity(w_hat)
    speed = float(torch.sqrt(u**2 + v**2).max())
    dx = 2 * math.pi / sp.n
    return min(dt_max, cfl * dx / speed) if speed > 0 else dt_max


def advance(sp: Spectral, w_hat: torch.Tensor, duration: float, *, cfl: float,
            dt_max: float, on_step=None) -> torch.Tensor:
    """Integrate for exactly ``duration`` time units with stable steps; raises on blow-up.
    ``on_step``: None, or a callable told the time reached after every step (progress)."""
    t = 0.0
    while t < duration - 1e-12:
        dt = min(stable_dt(sp, w_hat, cfl, dt_max), duration - t)
        w_hat = step(sp, w_hat, dt)
        t += dt
        if on_step is not None:
            on_step(t)
    if not torch.isfinite(w_hat).all():
        raise BlowUp("the vorticity blew up: lower data.cfl or data.forcing, or raise data.viscosity")
    return w_hat


def random_vorticity(n: int, seed: int, *, peak: float = 4.0, device="cpu") -> torch.Tensor:
    """A smooth random initial vorticity (n, n) with energy near wavenumber ``peak``, unit rms."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, n, generator=g, dtype=torch.float64).to(device)
    k = torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64, device=device)
    kk = torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    shaped = torch.fft.ifft2(torch.fft.fft2(noise) * kk * torch.exp(-((kk / peak) ** 2))).real
    return shaped / shaped.std()


def coarse_grain(w: torch.Tensor, factor: int) -> torch.Tensor:
    """Block average of (..., n, n) fields over factor x factor cells: (..., n/f, n/f)."""
    *lead, n, m = w.shape
    return w.reshape(*lead, n // factor, factor, m // factor, factor).mean((-3, -1))

"""Sequential second-order samplers of the probability-flow ODE (docs/algorithms.md section 7).

Both are written on the denoised mean D(y, u) = (y + s^2 score) / a (Tweedie), the quantity
their papers step with, on the OU clock's VP state y:

- ``dpmpp-2m``: DPM-Solver++(2M) of Lu et al. (2022), multistep in the half log-SNR
  lambda = log(a / s): y_i = (s_i / s_{i-1}) y_{i-1} + a_i (1 - e^{-h_i}) D', h_i = lambda_i -
  lambda_{i-1}, with D' = (1 + 1/(2 r)) D_{i-1} - 1/(2 r) D_{i-2}, r = h_{i-1} / h_i, and
  D' = D_{i-1} on the first step. One model call a step.
- ``edm-heun``: the second-order sampler of Karras et al. (2022) without churn: Euler in
  sigma = s / a on the VE state x = y / a, d = (x - D) / sigma, corrected by the slope at the
  step's end (Heun). Two model calls a step.

Each returns after ``grid.steps`` steps with Stats whose rounds are its sequential model calls.
"""
from __future__ import annotations

import torch

from pipeline.clock import noise_std, signal
from pipeline.comm import SerialComm
from pipeline.grids import Grid
from pipeline.noise import Noise
from pipeline.samplers.common import check_finite, evaluate, finish
from pipeline.samplers.options import Options, Stats


def denoised(model, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """D(y, u) = (y + s(u)^2 score(y, u)) / a(u) for states y (B, *S) at one clock u (1,)."""
    a, s = float(signal(u)), float(noise_std(u))
    return (y + s * s * evaluate(model, y[:, None], u.reshape(1))[:, 0]) / a


def half_log_snr(u: torch.Tensor) -> torch.Tensor:
    """lambda(u) = log(a / s) = -u/2 - log(1 - e^{-u}) / 2, float64 (N,)."""
    return -0.5 * u - 0.5 * torch.log(-torch.expm1(-u))


def dpmpp_2m(model, y0: torch.Tensor, grid: Grid, noise: Noise, *, comm=SerialComm(),
             options: Options = Options()):
    """DPM-Solver++(2M) from y0 (B, *S) at u_max to u_min; returns (y (B, *S), Stats)."""
    u = grid.u.to(torch.float64)
    lam, a, s = half_log_snr(u), signal(u), noise_std(u)
    y, previous = y0, None
    for i in range(grid.steps):
        d = denoised(model, y, u[i])
        h = float(lam[i + 1] - lam[i])
        if previous is None:
            blend = d
        else:  # the previous denoised mean makes the step second order
            r = float(lam[i] - lam[i - 1]) / h
            blend = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * previous
        y = float(s[i + 1] / s[i]) * y - float(a[i + 1] * torch.expm1(torch.tensor(-h))) * blend
        previous = d
        if (i + 1) % 50 == 0 or i + 1 == grid.steps:  # a NaN shows within 50 steps, no sync per step
            check_finite(y, noise.keys, f"by step {i + 1}")
    stats = Stats(rounds=grid.steps, model_calls=float(grid.steps), sweeps=(1,) * grid.steps)
    return finish(model, y, stats, float(u[-1]), options)


def edm_heun(model, y0: torch.Tensor, grid: Grid, noise: Noise, *, comm=SerialComm(),
             options: Options = Options()):
    """EDM's Heun sampler (no churn) from y0 (B, *S); returns (y (B, *S), Stats)."""
    u = grid.u.to(torch.float64)
    a = signal(u)
    sigma = noise_std(u) / a
    x = y0 / float(a[0])  # the VE state
    for i in range(grid.steps):
        d = (x - denoised(model, x * float(a[i]), u[i])) / float(sigma[i])
        step = float(sigma[i + 1] - sigma[i])
        end = x + step * d
        d_end = (end - denoised(model, end * float(a[i + 1]), u[i + 1])) / float(sigma[i + 1])
        x = x + step * 0.5 * (d + d_end)
        if (i + 1) % 50 == 0 or i + 1 == grid.steps:
            check_finite(x, noise.keys, f"by step {i + 1}")
    stats = Stats(rounds=2 * grid.steps, model_calls=2.0 * grid.steps,
                  sweeps=(2,) * grid.steps)
    return finish(model, x * float(a[-1]), stats, float(u[-1]), options)

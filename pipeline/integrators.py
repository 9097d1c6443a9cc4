"""Per-step coefficients of the one-step maps every sampler shares (docs/algorithms.md section 2).

Each step is affine in the state, the frozen score and the noise:

    y_{j+1} = decay_j * y_j + drift_j * g_j + noise_j * xi_j,   g_j = s(y_j, u_j).

Two families, both written on the score:

- ``exponential``: the score is frozen over the step and the linear part integrated exactly:
  decay = e^{h/2}, drift = c (e^{h/2} - 1) with c = 2 (SDE) or 1 (ODE), noise = sqrt(e^h - 1).
- ``eps``: eps = -s(u) * score is frozen instead, which is DDPM (ancestral, posterior variance,
  i.e. DDIM with eta = 1) for the SDE and DDIM (eta = 0) for the ODE:
  drift = -s_j (sqrt(s_{j+1}^2 - sigma^2) - e^{h/2} s_j), noise = sigma,
  sigma^2 = eta^2 (s_{j+1}^2 / s_j^2) (1 - e^{-h}).

``var`` is the residual scale of the state after step j (sections 3 and 4): e^{h} - 1 for the SDE,
1 (the VP marginal variance of unit-scale data) for the ODE.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.clock import noise_std


@dataclass(frozen=True)
class Steps:
    """Coefficients of N steps, each a float64 tensor (N,)."""

    decay: torch.Tensor
    drift: torch.Tensor
    noise: torch.Tensor
    var: torch.Tensor

    def slice(self, lo: int, hi: int) -> "Steps":
        """The coefficients of steps [lo, hi)."""
        return Steps(self.decay[lo:hi], self.drift[lo:hi], self.noise[lo:hi], self.var[lo:hi])


def _exponential(u: torch.Tensor, stochastic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    h = u[:-1] - u[1:]
    c = 2.0 if stochastic else 1.0
    drift = c * torch.expm1(h / 2)
    noise = torch.sqrt(torch.expm1(h)) if stochastic else torch.zeros_like(h)
    return drift, noise


def _eps(u: torch.Tensor, stochastic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    h = u[:-1] - u[1:]
    s_now, s_next = noise_std(u[:-1]), noise_std(u[1:])
    eta = 1.0 if stochastic else 0.0
    sigma = eta * (s_next / s_now) * torch.sqrt(-torch.expm1(-h))
    drift = -s_now * (torch.sqrt(s_next**2 - sigma**2) - torch.exp(h / 2) * s_now)
    return drift, sigma


# sampler.form: one entry per name of pipeline.choices.FORMS (which the config is checked against)
FORMS = {"exponential": _exponential, "eps": _eps}


def step_coefficients(u: torch.Tensor, *, stochastic: bool, form: str = "exponential") -> Steps:
    """Coefficients for the grid ``u`` (N+1,) on the OU clock; see the module docstring."""
    if form not in FORMS:
        raise ValueError(f"unknown integrator {form!r}: use one of {', '.join(FORMS)}")
    u = u.to(torch.float64)
    h = u[:-1] - u[1:]
    drift, noise = FORMS[form](u, stochastic)
    var = torch.expm1(h) if stochastic else torch.ones_like(h)
    return Steps(decay=torch.exp(h / 2), drift=drift, noise=noise, var=var)

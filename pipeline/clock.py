"""Forward processes mapped onto the one OU clock (docs/algorithms.md section 1).

Every process here is described by its native time ``t`` (a DDPM index, a continuous VP time,
an EDM sigma, a flow-matching time) and the map to the OU clock ``u = -2 log a(t)``, where
``a`` is the signal coefficient of the equivalent variance-preserving marginal
``x_u = e^{-u/2} x_0 + sqrt(1 - e^{-u}) z``. ``input_scale(u)`` turns a VP state into the
network's native state (1 for VP, ``1/a`` for VE, ``1/(a+s)`` for flow matching).

All functions take and return float64 tensors of any shape.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def signal(u: Tensor) -> Tensor:
    """Signal coefficient a(u) = e^{-u/2} of the VP marginal."""
    return torch.exp(-0.5 * u)


def noise_std(u: Tensor) -> Tensor:
    """Noise coefficient s(u) = sqrt(1 - e^{-u}) of the VP marginal."""
    return torch.sqrt(-torch.expm1(-u))


@dataclass(frozen=True)
class OU:
    """The OU clock itself: native time is u."""

    def u_of_t(self, t: Tensor) -> Tensor:
        """t itself."""
        return t

    def t_of_u(self, u: Tensor) -> Tensor:
        """u itself."""
        return u

    def input_scale(self, u: Tensor) -> Tensor:
        """Ones: the network sees the VP state."""
        return torch.ones_like(u)


@dataclass(frozen=True)
class VPLinear:
    """Continuous VP-SDE with linear beta(t) on t in [0, 1] (Song et al. 2021)."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def u_of_t(self, t: Tensor) -> Tensor:
        """u = beta_min t + (beta_max - beta_min) t^2 / 2, the integrated beta."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def t_of_u(self, u: Tensor) -> Tensor:
        """The positive root t of u_of_t(t) = u."""
        db = self.beta_max - self.beta_min
        # Positive root of 0.5 db t^2 + beta_min t - u = 0, in the cancellation-free form.
        return 2 * u / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * db * u))

    def input_scale(self, u: Tensor) -> Tensor:
        """Ones: the network sees the VP state."""
        return torch.ones_like(u)


@dataclass(frozen=True)
class VPCosine:
    """Cosine schedule of Nichol and Dhariwal, alpha_bar(t) = cos^2((t+s)/(1+s) pi/2) / f(0)."""

    s: float = 0.008
    t_max: float = 0.9946  # keeps alpha_bar > 0, as the usual beta <= 0.999 clipping does

    def _phase(self, t: Tensor) -> Tensor:
        return (t + self.s) / (1 + self.s) * (math.pi / 2)

    def u_of_t(self, t: Tensor) -> Tensor:
        """u = -2 log(cos(phase(t)) / cos(phase(0)))."""
        c0 = math.cos(self.s / (1 + self.s) * math.pi / 2)
        return -2 * torch.log(torch.cos(self._phase(t)) / c0)

    def t_of_u(self, u: Tensor) -> Tensor:
        """The inverse of u_of_t, by arccos."""
        c0 = math.cos(self.s / (1 + self.s) * math.pi / 2)
        phase = torch.arccos(torch.exp(-0.5 * u) * c0)
        return phase * (2 / math.pi) * (1 + self.s) - self.s

    def input_scale(self, u: Tensor) -> Tensor:
        """Ones: the network sees the VP state."""
        return torch.ones_like(u)


@dataclass(frozen=True)
class DiscreteVP:
    """Discrete DDPM schedule: index i = 0..T-1 with alpha_bar_i = prod_{j<=i} (1 - beta_j).

    Native time is the (continuous) index; u is interpolated linearly between integer
    indices, so u_of_t and t_of_u are exact inverses and exact at the integers.
    """

    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_steps: int = 1000
    # alpha_bar_i given outright (a trained model's own schedule, e.g. as diffusers computes
    # it); empty: linear betas beta_start .. beta_end in float64
    alphas_cumprod: tuple[float, ...] = ()

    def table(self) -> Tensor:
        """u at each integer index, shape (T,)."""
        if self.alphas_cumprod:
            return -torch.log(torch.tensor(self.alphas_cumprod, dtype=torch.float64))
        betas = torch.linspace(self.beta_start, self.beta_end, self.num_steps, dtype=torch.float64)
        return -torch.cumsum(torch.log1p(-betas), 0)

    def u_of_t(self, t: Tensor) -> Tensor:
        """u at the fractional index t, linear between the table's integers (t clamped to
        [0, T - 1])."""
        table = _table_on(self, str(t.device))
        t = t.to(torch.float64).clamp(0, self.num_steps - 1)
        i = t.floor().clamp(max=self.num_steps - 2).long()
        w = t - i
        return table[i] * (1 - w) + table[i + 1] * w

    def t_of_u(self, u: Tensor) -> Tensor:
        """The fractional index whose u is u: the inverse of u_of_t."""
        table = _table_on(self, str(u.device))
        i = (torch.searchsorted(table, u.contiguous()) - 1).clamp(0, self.num_steps - 2)
        w = (u - table[i]) / (table[i + 1] - table[i])
        return i + w

    def input_scale(self, u: Tensor) -> Tensor:
        """Ones: the network sees the VP state."""
        return torch.ones_like(u)


@dataclass(frozen=True)
class VE:
    """Variance-exploding / EDM process x = x_0 + sigma z; native time is sigma."""

    def u_of_t(self, sigma: Tensor) -> Tensor:
        """u = log(1 + sigma^2), for the VP state x / sqrt(1 + sigma^2)."""
        return torch.log1p(sigma**2)

    def t_of_u(self, u: Tensor) -> Tensor:
        """sigma = sqrt(e^u - 1)."""
        return torch.sqrt(torch.expm1(u))

    def input_scale(self, u: Tensor) -> Tensor:
        """1 / a(u): the VE state x_0 + sigma z from the VP state."""
        return 1 / signal(u)


@dataclass(frozen=True)
class Flow:
    """Rectified-flow interpolation x_t = (1 - t) x_0 + t z, t in [0, 1)."""

    def u_of_t(self, t: Tensor) -> Tensor:
        """u = log(1 + (t / (1 - t))^2): sigma = t / (1 - t) on the VE scale."""
        return torch.log1p((t / (1 - t)) ** 2)

    def t_of_u(self, u: Tensor) -> Tensor:
        """t = s / (a + s), a and s the VP coefficients."""
        a, s = signal(u), noise_std(u)
        return s / (a + s)

    def input_scale(self, u: Tensor) -> Tensor:
        """1 / (a + s): the flow state from the VP state."""
        return 1 / (signal(u) + noise_std(u))


def trained_top(process) -> float:
    """The most noise (OU-clock u) at which a network trained on ``process`` was called in
    training: a DDPM's last timestep, the linear VP's t = 1; inf for the others (the cosine's
    t = 1 reaches u = inf; VE, EDM and flow networks choose their own range)."""
    inner = getattr(process, "process", process)  # a unit-input network's process
    if isinstance(inner, DiscreteVP):
        return float(inner.table()[-1])
    if isinstance(inner, VPLinear):
        return float(inner.u_of_t(torch.tensor(1.0, dtype=torch.float64)))
    return math.inf


def _linear_betas(start: float, end: float, steps: int) -> torch.Tensor:
    return torch.linspace(start, end, steps, dtype=torch.float32)


def _scaled_linear_betas(start: float, end: float, steps: int) -> torch.Tensor:
    return torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float32) ** 2


def _cosine_betas(start: float, end: float, steps: int) -> torch.Tensor:
    """diffusers' ``squaredcos_cap_v2`` (it takes no start or end)."""
    bar = [math.cos((i / steps + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(steps + 1)]
    return torch.tensor([min(1 - bar[i + 1] / bar[i], 0.999) for i in range(steps)],
                        dtype=torch.float32)


# model.beta_schedule: one entry per name of pipeline.choices.BETA_SCHEDULES (which the config
# is checked against; this module imports nothing of piadm's, so that models/ may use it)
BETAS = {"linear": _linear_betas, "scaled_linear": _scaled_linear_betas,
         "cosine": _cosine_betas}


def ddpm_alphas_cumprod(schedule: str, beta_start: float, beta_end: float,
                        steps: int) -> tuple[float, ...]:
    """alpha_bar_i, i = 0..steps-1, of a DDPM schedule computed as diffusers computes it (betas
    in float32, ``cosine`` being its ``squaredcos_cap_v2``), so that a network trained there
    sees the same noise levels here: (steps,) floats."""
    if schedule not in BETAS:
        raise ValueError(f"unknown beta schedule {schedule!r}: use one of {', '.join(BETAS)}")
    betas = BETAS[schedule](beta_start, beta_end, steps)
    return tuple(torch.cumprod(1.0 - betas, 0).double().tolist())


PROCESSES = {
    "ou": OU,
    "vp-linear": VPLinear,
    "vp-cosine": VPCosine,
    "ddpm": DiscreteVP,
    "ve": VE,
    "edm": VE,
    "flow": Flow,
}


@functools.lru_cache(maxsize=8)
def _table_on(schedule: DiscreteVP, device: str) -> Tensor:
    """``schedule.table()`` on ``device``, made once: built on the host and copied at every
    model call, the copy made the host wait for a GPU's queued work each time. Read only."""
    return schedule.table().to(device)

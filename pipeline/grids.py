"""Time grids on the OU clock, cut into Picard blocks (docs/algorithms.md sections 3 and 4).

A ``Grid`` holds the OU clock at every state the sampler visits, ``u[0] = u_max`` (prior end)
down to ``u[N] = u_min`` (early stopping), and the block boundaries. Step j goes from state
j to state j + 1 with the model evaluated at ``u[j]``; backward time is ``tau = u_max - u``.

Three families:

- ``ou``: uniform steps in the bulk (u >= knee) and geometric steps below the knee, so that
  h_j is proportional to u_j near the data end, where the score's Lipschitz constant grows
  like 1/u. Concretely the points are equally spaced in phi(u) = log u (u < knee) and
  log knee + (u - knee)/knee (u >= knee), which is continuous with a continuous slope.
- ``uniform``: uniform in the process's native time (DDPM indices, VP time t, sigma).
- ``edm``: the EDM rho-grid in sigma = sqrt(e^u - 1) (Karras et al. 2022, rho = 7).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.choices import EDM_RHO, OU_KNEE
from pipeline.clock import OU


@dataclass(frozen=True)
class Grid:
    """OU-clock grid ``u`` (N+1,) float64, decreasing, and block bounds ``edges`` (0 .. N)."""

    u: torch.Tensor
    edges: tuple[int, ...]

    @property
    def steps(self) -> int:
        """The number of steps, one fewer than the points of ``u``."""
        return self.u.numel() - 1

    @property
    def blocks(self) -> list[tuple[int, int]]:
        """Half-open step ranges [lo, hi) of the blocks, in sampling order."""
        return list(zip(self.edges[:-1], self.edges[1:]))

    @property
    def h(self) -> torch.Tensor:
        """Step sizes in backward time, (N,): h_j = u_j - u_{j+1} > 0."""
        return self.u[:-1] - self.u[1:]


def block_edges(steps: int, block_size: int) -> tuple[int, ...]:
    """Cut ``steps`` steps into consecutive blocks of ``block_size`` (the last may be short)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return tuple(range(0, steps, block_size)) + (steps,)


def _phi(u: torch.Tensor, knee: float) -> torch.Tensor:
    return torch.where(u < knee, torch.log(u), math.log(knee) + (u - knee) / knee)


def _phi_inv(p: torch.Tensor, knee: float) -> torch.Tensor:
    return torch.where(p < math.log(knee), torch.exp(p), knee * (1 + p - math.log(knee)))


def ou_grid(steps: int, u_min: float, u_max: float, knee: float = OU_KNEE) -> torch.Tensor:
    """Uniform-in-bulk, geometric-near-data grid, (steps+1,) float64 from u_max to u_min."""
    knee = min(max(knee, u_min), u_max)
    lo = _phi(torch.tensor(u_min, dtype=torch.float64), knee)
    hi = _phi(torch.tensor(u_max, dtype=torch.float64), knee)
    u = _phi_inv(torch.linspace(float(hi), float(lo), steps + 1, dtype=torch.float64), knee)
    u[0], u[-1] = u_max, u_min
    return u


def uniform_grid(steps: int, u_min: float, u_max: float, process=OU()) -> torch.Tensor:
    """Uniform in the process's native time between the times of u_max and u_min: u
    (steps + 1,) float64, decreasing from u_max to u_min."""
    ends = process.t_of_u(torch.tensor([u_max, u_min], dtype=torch.float64))
    t = torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=torch.float64)
    u = process.u_of_t(t)
    u[0], u[-1] = u_max, u_min
    return u


def edm_grid(steps: int, u_min: float, u_max: float, rho: float = EDM_RHO) -> torch.Tensor:
    """EDM rho-grid: sigma_i^(1/rho) uniform between sigma_max and sigma_min; u (steps + 1,)
    float64, decreasing from u_max to u_min."""
    smax, smin = math.sqrt(math.expm1(u_max)), math.sqrt(math.expm1(u_min))
    r = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    sigma = (smax ** (1 / rho) + r * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    u = torch.log1p(sigma**2)
    u[0], u[-1] = u_max, u_min
    return u


# sampler.grid: one entry per name of pipeline.choices.GRIDS (which the config is checked against)
GRIDS = {
    "ou": lambda n, lo, hi, process, knee, rho: ou_grid(n, lo, hi, knee),
    "uniform": lambda n, lo, hi, process, knee, rho: uniform_grid(n, lo, hi, process),
    "edm": lambda n, lo, hi, process, knee, rho: edm_grid(n, lo, hi, rho),
}


class RepeatedSteps(ValueError):
    """A scheduler's timesteps repeat (a second-order scheduler's two calls a step): no
    number of steps gives a grid of them."""


def scheduler_grid(u: torch.Tensor, block_size: int) -> Grid:
    """A blocked grid on the clocks ``u`` (N+1,) a model's scheduler gives, which may end at
    u = 0 (the clean data)."""
    u = u.to(torch.float64)
    if bool((u[:-1] == u[1:]).any()):
        raise RepeatedSteps("the scheduler's timesteps repeat (a second-order scheduler, such "
                            "as Heun, KDPM2 or PNDM's PRK steps, calls twice at one)")
    if not bool((u[:-1] > u[1:]).all()) or float(u[-1]) < 0:
        raise ValueError("the scheduler's timesteps do not make a decreasing noise level")
    return Grid(u=u, edges=block_edges(u.numel() - 1, block_size))


def make_grid(
    kind: str,
    steps: int,
    *,
    u_min: float,
    u_max: float,
    block_size: int,
    process=OU(),
    knee: float = OU_KNEE,
    rho: float = EDM_RHO,
) -> Grid:
    """Build a blocked grid of ``steps`` steps; ``kind`` is one of ``GRIDS``."""
    if not 0 < u_min < u_max:
        raise ValueError(f"need 0 < u_min < u_max, got u_min={u_min}, u_max={u_max}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if kind not in GRIDS:
        raise ValueError(f"unknown grid {kind!r}: use one of {', '.join(GRIDS)}")
    u = GRIDS[kind](steps, u_min, u_max, process, knee, rho)
    if not bool((u[:-1] > u[1:]).all()):
        raise ValueError(f"grid {kind!r} with {steps} steps is not strictly decreasing in u")
    return Grid(u=u, edges=block_edges(steps, block_size))

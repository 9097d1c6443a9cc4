"""Gaussian mixture in d dimensions with isotropic components and its exact score at every u.

Component k: weight w_k, mean mu_k, covariance sigma_k^2 I. The VP marginal at OU clock u is
the mixture of N(a mu_k, (a^2 sigma_k^2 + s^2) I), a = e^{-u/2}, s^2 = 1 - e^{-u}, whose score
is sum_k r_k(x) (a mu_k - x) / (a^2 sigma_k^2 + s^2) with responsibilities r_k(x).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class GaussianMixture:
    """Exact score model (``models.contract``) of an isotropic Gaussian mixture on ``shape``.

    ``means`` (K, d) with d = prod(shape), ``stds`` (K,), ``weights`` (K,) summing to 1.
    """

    shape: tuple[int, ...]
    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor
    log_weights: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        k, d = self.means.shape
        if d != math.prod(self.shape) or self.stds.shape != (k,) or self.weights.shape != (k,):
            raise ValueError("gmm: means must be (K, prod(shape)), stds and weights (K,)")
        if not torch.isclose(self.weights.sum(), torch.tensor(1.0, dtype=self.weights.dtype)):
            raise ValueError("gmm: weights must sum to 1")
        object.__setattr__(self, "log_weights", torch.log(self.weights))

    @classmethod
    def random(cls, shape, components: int = 3, spread: float = 3.0, std: float = 0.5,
               seed: int = 0, weights=None) -> "GaussianMixture":
        """Well-separated modes: means of norm ``spread * sqrt(d)``-ish at random directions."""
        d = math.prod(shape)
        rng = np.random.default_rng(seed)
        means = torch.from_numpy(rng.standard_normal((components, d))) * spread / math.sqrt(1 + spread**2)
        w = torch.full((components,), 1 / components, dtype=torch.float64) if weights is None \
            else torch.as_tensor(weights, dtype=torch.float64)
        stds = torch.full((components,), std / math.sqrt(1 + spread**2), dtype=torch.float64)
        return cls(tuple(shape), means, stds, w / w.sum())

    @property
    def data_bound(self) -> float:
        """S: the largest eigenvalue of the mixture's covariance,
        sum_k w_k sigma_k^2 I + sum_k w_k (mu_k - mu)(mu_k - mu)^T, from its K x K Gram form."""
        w = self.weights
        centred = self.means - w @ self.means
        gram = torch.sqrt(w)[:, None] * (centred @ centred.T) * torch.sqrt(w)[None]
        return float((w * self.stds**2).sum() + torch.linalg.eigvalsh(gram).max())

    def responsibilities(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Posterior component probabilities (B, K) of states x (B, *shape) at clocks u (B,)."""
        return self._terms(x, u)[3]

    def _terms(self, x: torch.Tensor, u: torch.Tensor):
        """Flattened x (B, d), a (B, 1), component variances (B, K), responsibilities (B, K),
        all float64 on the CPU (a small exact model: its parameters stay there)."""
        xf = x.reshape(x.shape[0], -1).to("cpu", torch.float64)
        u = u.to("cpu", torch.float64)
        a = torch.exp(-0.5 * u)[:, None]
        var = a**2 * self.stds[None] ** 2 - torch.expm1(-u)[:, None]
        dist2 = _sqdist(xf, a, self.means)
        logp = self.log_weights[None] - 0.5 * dist2 / var - 0.5 * xf.shape[1] * torch.log(var)
        return xf, a, var, torch.softmax(logp, dim=1)

    def __call__(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Exact score at (x (B, *shape), u (B,))."""
        xf, a, var, r = self._terms(x, u)
        # sum_k r_k (a mu_k - x) / var_k
        coef = r / var
        score = a * (coef @ self.means) - coef.sum(1, keepdim=True) * xf
        return score.to(x.device, x.dtype).reshape(x.shape)

    def sample(self, n: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """n exact draws (n, *shape) and their component labels (n,)."""
        rng = np.random.default_rng(seed)
        labels = torch.from_numpy(rng.choice(len(self.weights), size=n, p=self.weights.numpy()))
        z = torch.from_numpy(rng.standard_normal((n, self.means.shape[1])))
        x = self.means[labels] + self.stds[labels, None] * z
        return x.reshape(n, *self.shape).to(dtype), labels


def _sqdist(x: torch.Tensor, a: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """||x_b - a_b mu_k||^2, (B, K)."""
    return (x**2).sum(1, keepdim=True) - 2 * a * (x @ means.T) + a**2 * (means**2).sum(1)[None]


def mode_fractions(model: GaussianMixture, x: torch.Tensor, u: float) -> torch.Tensor:
    """Fraction of samples x (B, *shape) at clock u whose most likely mode is k, (K,)."""
    uu = torch.full((x.shape[0],), u, dtype=torch.float64)
    labels = model.responsibilities(x, uu).argmax(1)
    return torch.bincount(labels, minlength=len(model.weights)).to(torch.float64) / x.shape[0]


def weight_error(model: GaussianMixture, x: torch.Tensor, u: float, denoised: bool = False) -> float:
    """Largest |sampled mode fraction - mode weight| (the Tweedie mean classifies alike):
    x (B, *shape) at clock u."""
    return float((mode_fractions(model, x, u) - model.weights).abs().max())

"""Thin adapters turning a network's native output into the score on the OU clock.

``NetworkAdapter(net, process, prediction)`` answers the model contract
(``models.contract``) for a network trained on ``process`` (a ``pipeline.clock`` process)
that predicts one of:

- ``score``: the score of the network's own marginal (converted by the input scale);
- ``eps``: the noise z;
- ``x0``: the clean sample (a denoiser D, as in EDM);
- ``v``: v = a z - s x_0 (Salimans and Ho), in VP units;
- ``velocity``: the flow-matching velocity z - x_0 of x_t = (1 - t) x_0 + t z.

The network is called as ``net(x_native, t_native)`` with x_native = input_scale(u) * x.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from pipeline.clock import noise_std, signal


def _bcast(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return c.reshape(c.shape + (1,) * (x.dim() - c.dim()))


def score_from_eps(eps, x, u):
    """s = -eps / s(u): eps and x (B, *S), u (B,); returns (B, *S)."""
    return -eps / _bcast(noise_std(u), x)


def score_from_x0(x0, x, u):
    """s = (a x0 - x) / s^2: x0 and x (B, *S), u (B,); returns (B, *S)."""
    a, s = _bcast(signal(u), x), _bcast(noise_std(u), x)
    return (a * x0 - x) / s**2


def _score_from_v(v, x, u):
    a, s = _bcast(signal(u), x), _bcast(noise_std(u), x)
    return score_from_eps(s * x + a * v, x, u)


def _score_from_velocity(vel, x, u):
    a, s = _bcast(signal(u), x), _bcast(noise_std(u), x)
    t = s / (a + s)
    x_flow = x / (a + s)
    return score_from_eps(x_flow + (1 - t) * vel, x, u)


def _score_from_native_score(score_native, x, u, scale):
    # x_native = k x  =>  grad_x log p(x) = k * grad_{x_native} log p_native.
    return score_native * scale


_CONVERTERS: dict[str, Callable[..., torch.Tensor]] = {
    "eps": score_from_eps,
    "x0": score_from_x0,
    "v": _score_from_v,
    "velocity": _score_from_velocity,
}
PREDICTIONS = ("score", *_CONVERTERS)  # pipeline.choices.PREDICTIONS, for checking configs


@dataclass(frozen=True)
class NetworkAdapter:
    """Wrap ``net(x_native, t_native) -> prediction`` as a score model on the OU clock."""

    net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    process: Any
    prediction: str
    shape: tuple[int, ...]

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(
                f"unknown prediction {self.prediction!r}: use one of {', '.join(PREDICTIONS)}"
            )

    def __call__(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        u64 = u.to(torch.float64)
        scale = _bcast(self.process.input_scale(u64).to(x.dtype), x)
        t_native = self.process.t_of_u(u64).to(x.dtype)
        out = self.net(x * scale, t_native)
        if self.prediction == "score":
            return _score_from_native_score(out, x, u, scale)
        return _CONVERTERS[self.prediction](out, x, u.to(x.dtype))

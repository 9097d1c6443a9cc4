"""The one model contract every sampler calls.

A score model is any callable ``model(x, u) -> score`` with

- ``x``: tensor (B, *shape), a batch of VP states;
- ``u``: tensor (B,), the OU clock of each state (docs/algorithms.md section 1), same dtype as x;
- returns the score of the VP marginal at u, tensor (B, *shape), same dtype and device as x.

Exact models implement it directly; learned networks are wrapped by ``models.adapters``.
Networks know nothing about samplers, and samplers know nothing about parameterisations.
"""
from __future__ import annotations

from typing import Protocol

import torch


class ScoreModel(Protocol):
    """Score of the VP marginal at OU clock u: (B, *shape), (B,) -> (B, *shape)."""

    shape: tuple[int, ...]

    def __call__(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor: ...


def check_score_model(model, what: str, device) -> None:
    """Call a score model piadm did not build (a package's ``model.kind``) on zeros
    (2, *model.shape) at a middle noise level, on ``device``: one that fails, or answers with
    anything but a finite floating tensor of its input's shape, dtype and device, is a
    one-line error now rather than a traceback once its store exists. Tried in float32, then
    in float64 (a model of float64 arithmetic alone keeps the contract there). ``what``
    names it."""
    from pipeline.errors import ConfigError

    if model is None or not callable(model):
        raise ConfigError(f"config: {what}: its builder returned {type(model).__name__}, not a "
                          "score model (a callable model(x, u), models/contract.py)")
    try:
        shape = tuple(int(n) for n in model.shape)
    except (AttributeError, TypeError, ValueError):
        raise ConfigError(f"config: {what}: its model has no shape (model.shape, a tuple of "
                          "the field's dims, is part of the score-model contract in "
                          "models/contract.py)") from None
    problems = [_contract_problem(model, shape, dtype, device)
                for dtype in (torch.float32, torch.float64)]
    if all(problems):  # the float32 call's, the run's default dtype
        raise ConfigError(f"config: {what}: {problems[0]}")


def _contract_problem(model, shape: tuple[int, ...], dtype, device) -> str:
    """Why ``model`` called on zeros (2, *shape) of ``dtype`` breaks the contract; ""."""
    x = torch.zeros((2, *shape), dtype=dtype, device=device)
    dims = ", ".join(map(str, (2, *shape)))
    try:
        out = model(x, torch.full((2,), 1.0, dtype=dtype, device=device))
    except Exception as err:
        said = ((str(err).strip().splitlines() or [""])[0])[:160]
        return (f"calling its model(x, u) on a ({dims}) {dtype} state failed "
                f"({type(err).__name__}: {said}): fix its builder, or model.shape")
    wrong = (f"returns {type(out).__name__}" if not isinstance(out, torch.Tensor) else
             f"returns shape {list(out.shape)}" if tuple(out.shape) != tuple(x.shape) else
             f"returns {out.dtype}" if out.dtype != x.dtype else
             f"returns its score on {out.device}" if out.device != x.device else
             "returns NaN/Inf" if not bool(torch.isfinite(out).all()) else "")
    return (f"its model(x, u) {wrong} for a ({dims}) {dtype} state on {x.device}: a score "
            "model returns a finite tensor of its input's shape, dtype and device "
            "(models/contract.py)" if wrong else "")

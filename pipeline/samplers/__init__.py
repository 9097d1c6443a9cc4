"""Samplers sharing one signature:

    sample(model, y0, grid, noise, *, comm, options) -> (y, Stats)

with y0 and y (B, *shape) tensors, ``grid`` a ``pipeline.grids.Grid``, ``noise`` a
``pipeline.noise.Noise`` for the batch, ``comm`` a communicator (``pipeline.comm``) and
``options`` a ``pipeline.samplers.options.Options``.

``REGISTRY`` below is the one place a sampler is declared: where its function lives, the
sequential sampler whose path it reproduces, how it cuts the steps, and what it needs from
the ``[sampler]`` settings. No sampler module (nor torch) is imported until a sampler is
used, so that the CLI's help and its config checks stay light.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.samplers.options import (PC_WINDOW_POINTS, THETAS, WINDOW_POINTS, Options,
                                       PicardDivergence, Stats, run_notes,
                                       window_points)


@dataclass(frozen=True)
class Registered:
    """A sampler's declaration.

    target: ``module:function``. reference: the sequential sampler it reproduces with the same
    noise (itself for a sequential one). windowed: slides a window of ``sampler.window``
    points (``default_window`` when 0) and stops on ``sampler.tol``, which it therefore
    needs. blocked: cuts the steps into blocks of ``sampler.block_size``.
    corrector: runs the Langevin corrector's ``sampler.corrector_steps`` points after each block.
    needs_tol: stops on ``sampler.tol``. whole_path: its rounds span every step not yet
    settled, so its time slices cut ``sampler.steps``. state: field-sized buffers a member
    holds at least per point of a round (``points``), model calls aside: measured peaks on
    ``grf`` rounded down to a floor (``pipeline.memory.sampler_floor``). revision: raised when
    the sampler's
    way to its path changes (its rounds, calls and the tolerance a calibration finds), so
    that cached calibrations and planner profiles of the old one are measured again.
    superseded: (revision, fixed, why) of older revisions whose members stand apart from this
    one's (a fault mended at ``fixed``, ISO 8601 UTC): a store that revision filled, made
    before then (stores recorded their sampler's revision only later), is not resumed or
    grown by this one.
    linear: for a sequential sampler, what its output is a linear map of on a linear (Gaussian)
    score: ``"prior"`` (the prior draw alone), ``"path"`` (the prior and its step noise); ""
    for one whose stopping rule makes it depend otherwise (``pipeline.quality``'s exact W2).
    calls_per_step: model calls a sequential sampler makes a step (Heun: two).
    thetas: the ``sampler.theta`` values it runs as asked (its corrector's): every one for
    ``pc-window``, ``"one"`` for ``pc-window-ode``, which always takes it; none elsewhere.
    theta_state: (theta, buffers) a corrector keeps per point and member beyond ``state``
    (the learned corrector: each slot's last evaluated state and score).
    """

    target: str
    reference: str
    windowed: bool = False
    blocked: bool = False
    corrector: bool = False
    needs_tol: bool = False  # stops on sampler.tol (every windowed sampler does too)
    whole_path: bool = False
    state: float = 0.0
    revision: int = 1
    superseded: tuple[tuple[int, str, str], ...] = ()
    default_window: int = 0  # the window's points when sampler.window is 0 (windowed only)
    linear: str = ""
    calls_per_step: int = 1
    thetas: tuple[str, ...] = ()
    theta_state: tuple[tuple[str, int], ...] = ()

    def load(self):
        """The sampler function ``target`` names (``"module:function"``), imported now."""
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)

    def state_fields(self, theta: str = "") -> float:
        """``state`` plus what the corrector ``theta`` keeps besides, per point and member."""
        return self.state + dict(self.theta_state).get(theta, 0)

    def round_collectives(self) -> int:
        """Collectives a round makes on several time slices, whatever its corrector: two
        (``tests/test_collectives.py`` counts them)."""
        return 2

    def window_points(self, window: int, steps: int) -> int:
        """The points of a window set to ``window`` (0: the default) on a path of ``steps``."""
        return window_points(window, self.default_window, steps)

    @property
    def sliced(self) -> bool:
        """Whether time slices split its rounds; a sequential sampler runs whole on each."""
        return self.blocked or self.windowed or self.whole_path

    def points(self, s) -> dict[str, int]:
        """The points each ``[sampler]`` setting ``s`` gives a round, by setting name: a layout
        needs at most that many time slices."""
        if self.whole_path:
            points = {"steps": s.steps}
        elif self.windowed:
            points = {"window": self.window_points(s.window, s.steps)}
        else:
            points = {"block_size": min(s.block_size, s.steps)}
        if self.corrector and s.corrector_steps > 0:
            points["corrector_steps"] = s.corrector_steps
        return points

    def problems(self, s) -> list[tuple[str, str]]:
        """(key, problem) for each ``[sampler]`` setting of ``s`` this sampler cannot run with."""
        if (self.windowed or self.needs_tol) and s.tol is None:
            return [("sampler.tol", f"must be set for sampler.method = {s.method!r}, a sliding "
                     "window that stops on it: a number (window: ParaDiGMS uses 0.1) or "
                     "\"auto\" to calibrate it against the sequential sampler")]
        return []


_SDE, _ODE = "sequential-sde", "sequential-ode"
# why window revision 1's members stand apart: at steps past h = 2 ln 2 (30 steps from
# u_max = 40) a far guess's rounding stayed in accepted points, 1.0 from the sequential path;
# mended then (stores made after it carry revision 1 until the revision was raised)
_RING_FIXED = "2026-12-05T21:37:58Z"
_RING_ROUNDING = ("kept a far guess's rounding in accepted points at coarse steps (h > 2 ln 2), "
                  "up to 1.0 from the sequential path")

REGISTRY = {
    "sequential-sde": Registered("pipeline.samplers.sequential:sequential_sde", _SDE, state=1,
                                 linear="path"),
    "sequential-ode": Registered("pipeline.samplers.sequential:sequential_ode", _ODE,
                                 linear="prior"),
    # second-order sequential solvers, each its own reference (highorder.py)
    "dpmpp-2m": Registered("pipeline.samplers.highorder:dpmpp_2m", "dpmpp-2m", linear="prior"),
    "dpmpp-2m-sde": Registered("pipeline.samplers.highorder:dpmpp_2m_sde", "dpmpp-2m-sde",
                               linear="path"),
    # its churn's noise is drawn along the path as well (pipeline.quality.draws_noise)
    "edm-heun": Registered("pipeline.samplers.highorder:edm_heun", "edm-heun", linear="prior",
                           calls_per_step=2),
    "dpmpp-2m-window": Registered("pipeline.samplers.highorder:dpmpp_2m_window", "dpmpp-2m",
                                  needs_tol=True, whole_path=True, state=8),
    # revision 2: a diverging block's redo starts after the states its sweeps made exact;
    # 3: each diverged member is redone from its own exact state beside the others' sweeps
    # (a block takes at most its steps in rounds), and a block across which the linear part
    # grows past 2^8 sums in float64
    "piadm-sde": Registered("pipeline.samplers.picard:piadm_sde", _SDE, blocked=True, state=10,
                            revision=3),
    "piadm-ode": Registered("pipeline.samplers.picard:piadm_ode", _ODE, blocked=True,
                            corrector=True, state=8, revision=3),
    # revision 2: a point's chain offset is its predecessors' sum (ring._plus_before)
    "window": Registered("pipeline.samplers.window:window_sde", _SDE, windowed=True, state=12,
                         default_window=WINDOW_POINTS, revision=2,
                         superseded=((1, _RING_FIXED, _RING_ROUNDING),)),
    "window-ode": Registered("pipeline.samplers.window:window_ode", _ODE, windowed=True,
                             state=10, default_window=WINDOW_POINTS, revision=2,
                             superseded=((1, _RING_FIXED, _RING_ROUNDING),)),
    # revision 2: the rebuild scales its lag by theta = J_max (a tolerance means less error);
    # 3: the learned corrector certifies each point's error as it will have grown by the
    # path's end, and keeps the modes it has learned; 4: it corrects each point along its
    # last change (a second scan); 5: it learns from a round's secants from the next round
    # on and folds its second scan into the first one's Allgather, two collectives a round
    "pc-window": Registered("pipeline.samplers.pcwindow:pc_window_sde", _SDE, windowed=True,
                            state=8, revision=5, default_window=PC_WINDOW_POINTS,
                            thetas=THETAS, theta_state=(("secant", 3),)),
    # revision 2: the predictor extrapolates the denoiser instead of freezing it
    "pc-window-ode": Registered("pipeline.samplers.pcwindow:pc_window_ode", _ODE,
                                windowed=True, state=7, revision=2,
                                default_window=PC_WINDOW_POINTS, thetas=("one",)),
}


class _Functions(Mapping):
    """Method name -> sampler function, each imported on first use."""

    def __getitem__(self, name: str):
        return REGISTRY[name].load()

    def __contains__(self, name) -> bool:  # Mapping's own would import the sampler to ask
        return name in REGISTRY

    def __iter__(self):
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)


SAMPLERS = _Functions()
REFERENCE = {name: entry.reference for name, entry in REGISTRY.items()}

__all__ = ["REGISTRY", "REFERENCE", "SAMPLERS", "Registered", "Options", "Stats",
           "PicardDivergence", "run_notes"]

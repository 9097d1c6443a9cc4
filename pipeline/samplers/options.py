"""Sampler options and statistics, shared by every sampler in this package."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import PiadmError


THETAS = ("j_max", "one", "secant")  # the values of Options.theta
WINDOW_SPLITS = ("slots", "replicated")  # the values of Options.window_split
REPLICABLE = ("pc-window", "pc-window-ode")  # the samplers that read Options.window_split
CHURNS = "edm-heun"  # the sampler that reads Options.churn

# The points p of a windowed sampler's window when Options.window is 0. Declared here, beside
# Options and without torch, so that checking a configuration reads them without importing
# the samplers (pipeline.samplers.REGISTRY).
WINDOW_POINTS = 100  # window, window-ode: p as ParaDiGMS ships it
PC_WINDOW_POINTS = 65  # pc-window, pc-window-ode: measured on grf and the shipped U-Nets
# (docs/algorithms.md)


def window_points(window: int, default: int, steps: int) -> int:
    """The points a window set to ``window`` holds on a path of ``steps`` (0: ``default``, the
    method's own): what the samplers slide and what the planner and memory count."""
    return min(window or default, steps)


@dataclass(frozen=True)
class Options:
    """Typed sampler settings; each sampler reads the ones it uses.

    form: ``exponential`` (score frozen per step) or ``eps`` (DDPM/DDIM), see integrators.
    max_sweeps: Picard sweeps per block (capped at the block's points, where it is exact).
    tol: stop a member's block once max_m r_m <= tol^2 (docs/algorithms.md sections 3 and
        6); None for exactly ``max_sweeps`` sweeps.
    window: points in the sliding window (``window``, ``pc-window``); 0: the sampler's own
        measured default.
    data_bound: S, an upper bound on the eigenvalues of the data covariance in model units,
        for ``pc-window``'s certified acceptance; inf (the safe default) assumes nothing.
    theta: ``pc-window``'s corrector, Yhat_{n+1} = theta Yhat_n + Phi(Y_n) - theta Y_n:
        ``j_max`` (the step's largest Jacobian eigenvalue, from data_bound), ``one`` (the
        whole step lagged) or ``secant`` (one theta per Fourier mode, learned from the
        model's answers, at the same two collectives a round); ``pc-window-ode`` always takes
        ``one``.
    window_split: how ``pc-window``'s time slices share a window: ``slots`` (each rank keeps
        a fixed range of its ring slots and their host work, two collectives a round) or
        ``replicated`` (every rank keeps the whole window and evaluates an even share of its
        points, one collective a round: balanced calls and one rank's result, to the model's
        rounding for other batch sizes, for the whole window's memory and host work on every
        rank).
    on_divergence: ``sequential`` (a member whose residual in a fixed block is NaN/Inf or
        exceeds ``divergence_threshold`` is stepped on one step a round from the last state
        its sweeps made exact) or ``error``; the window samplers raise ``PicardDivergence`` on
        NaN/Inf.
    corrector_*: underdamped Langevin corrector of PIADM-ODE (section 3); steps = 0 turns it off.
    churn: ``edm-heun``'s S_churn: each step first raises the noise level by the factor
        1 + min(churn / steps, sqrt 2 - 1) with fresh keyed noise; 0 (the default) is the ODE.
    denoise_final: return the Tweedie denoised mean E[x_0 | y] at u_min (one more model call).
    on_sweep: None, or a callable (step, sweep, residual) told after every parallel round (a
        Picard block's sweeps: not the rounds in which only its diverged members step): the
        first step of the block (window) in flight, the round within it and max r; the
        exponential-integrator sequential samplers tell it after each block of steps: (the
        next step, the block's steps, 0); the second-order ones do not. Progress reporting
        only; it must not change anything.
    """

    form: str = "exponential"
    max_sweeps: int = 100
    tol: float | None = None
    window: int = 0
    data_bound: float = float("inf")
    theta: str = "j_max"
    window_split: str = "slots"
    on_divergence: str = "sequential"
    divergence_threshold: float = 1e8
    corrector_steps: int = 8
    corrector_length: float = 1.0
    corrector_gamma: float = 1.0
    corrector_sweeps: int = 4
    churn: float = 0.0
    denoise_final: bool = False
    on_sweep: object = None


@dataclass(frozen=True)
class Stats:
    """What a sampling run cost.

    rounds: sequential batched model calls (the parallel depth).
    model_calls: field-sized model evaluations per trajectory (mean over the batch).
    residuals: max residual r over the batch after each sweep, in sweep order.
    sweeps: sweeps run in each block (or window advances), per block.
    fallbacks: blocks (each batch's count) with members stepped on one by one after their
        sweeps diverged.
    unsettled: blocks (each batch's count) whose members still had a residual above ``tol``
        when they reached ``max_sweeps`` sweeps, fewer than their points (where they would
        have been exact).
    """

    rounds: int = 0
    model_calls: float = 0.0
    residuals: tuple[float, ...] = ()
    sweeps: tuple[int, ...] = ()
    fallbacks: int = 0
    unsettled: int = 0

    def __add__(self, other: "Stats") -> "Stats":
        return Stats(
            self.rounds + other.rounds,
            self.model_calls + other.model_calls,
            self.residuals + other.residuals,
            self.sweeps + other.sweeps,
            self.fallbacks + other.fallbacks,
            self.unsettled + other.unsettled,
        )


def redone(blocks: int) -> str:
    """What ``Stats.fallbacks`` = ``blocks`` > 0 means, as every command that reports it says
    it: the run is right, but paid up to a sequential sampler's calls on top for those
    blocks (their steps after the states the sweeps had made exact)."""
    many = blocks > 1
    return (f"{blocks} Picard block{'s' if many else ''} diverged and {'were' if many else 'was'}"
            " finished step by step, at up to a sequential sampler's cost: lower "
            "sampler.block_size, or set sampler.on_divergence = 'error' to stop instead")


def unsettled(blocks: int, max_sweeps: int) -> str:
    """What ``Stats.unsettled`` = ``blocks`` > 0 means, as every command that reports it says
    it: those blocks' members stopped sweeping above the tolerance, so they may lie further
    from the sequential path than it allows."""
    many = blocks > 1
    return (f"{blocks} Picard block{'s' if many else ''} reached sampler.max_sweeps = "
            f"{max_sweeps} sweeps with {'their' if many else 'its'} residual still above "
            "sampler.tol, so some members may lie further from the sequential path than it "
            "allows: raise sampler.max_sweeps (a block of M steps is exact after M sweeps) or "
            "lower sampler.block_size")


def run_notes(fallbacks: int, unsettled_blocks: int, max_sweeps: int) -> list[str]:
    """The lines ``sample``, ``bench`` and ``calibrate`` say after a run whose ``Stats``
    counted ``fallbacks`` redone or ``unsettled_blocks`` unsettled blocks: a ``note:`` for
    the first (the members are right), a ``warning:`` for the second (they may not be)."""
    return ([f"note: {redone(fallbacks)}"] * bool(fallbacks)
            + [f"warning: {unsettled(unsettled_blocks, max_sweeps)}"] * bool(unsettled_blocks))


class PicardDivergence(PiadmError, RuntimeError):
    """A Picard block produced NaN/Inf or a runaway residual."""


class RanksParted(PiadmError, RuntimeError):
    """The ranks of a replicated window took different acceptances (their arithmetic differs).
    The ranks of its group raise it together, the other groups do not: not collective, so
    that the command line aborts the job (the other groups would wait for it at the end)."""

"""The layout planner's cost model: pure, no measuring and no MPI (``pipeline.planner``
measures its inputs).

A layout runs ``groups`` x ``time_slices`` ranks: groups share the member batches, the time
slices of a group split every round's points. With a model call of n items costing c(n)
seconds on a rank (the measured cost curve), a round of a sampler that evaluates P points per
member costs, on each of T slices with b members a batch,

    round = c(ceil(P / T) b) + h(ceil(P / T), b) + k L ceil(log2 T),

where h(n, b) is the sampler's own host work per round at n points of b members a rank
(measured at one member, and its growth to a larger batch), k its collectives per round and
L the latency of one collective stage. A replicated window (``sampler.window_split``) cuts
the round's P b points evenly and keeps the whole window on every slice:
c(ceil(P b / T)) + h(P, b) + L ceil(log2 T) + P b f / W, the last term the round's
scores (f bytes a field) gathered into each rank at W bytes a second. Where the profile recorded
the size of every model call of its member, the c term is the sum over those calls (each
split over the slices) rather than the rounds times the mean call: a block that falls back to
sequential steps makes one wide call and many of one point, which costs far more than as many
calls of the mean. Ranks that share a node's
cores share the part of that time that keeps a core busy: when R busy ranks of t threads each
run on C cores with R t > C, that part takes R t / C times longer (ranks of groups left without
a batch wait asleep). A batch takes the sampler's rounds
(measured on one member) times the round, and each group does ceil(batches / groups) batches,
a batch holding members of one item: items x ceil(members / b) batches in all.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass


# W, bytes a second that one Allgather brings into a rank, copies to and from its buffers
# included: measured on this project's 2-core machine (2 ranks gathering 96 fields of 4 KiB,
# 0.23 ms). Only a replicated window's payload, p b fields a round, is large enough to count.
DEFAULT_BANDWIDTH = 2e9


@dataclass(frozen=True)
class CostCurve:
    """Seconds of one model call of n items at the measured ``sizes`` (increasing): ``wall``
    in all and ``busy`` the part that keeps a CPU core busy (all of it for a model on the CPU,
    little for an accelerator's or the emulated one)."""

    sizes: tuple[int, ...]
    wall: tuple[float, ...]
    busy: tuple[float, ...]

    def at(self, n: int) -> tuple[float, float]:
        """(wall, busy) seconds of a call of n items: linear between the measured sizes,
        extended along the last segment past the largest (zero items cost nothing)."""
        if n <= 0:
            return 0.0, 0.0
        return _interp(self.sizes, self.wall, n), _interp(self.sizes, self.busy, n)


def _interp(xs: tuple[int, ...], ys: tuple[float, ...], x: float) -> float:
    """``ys`` measured at the increasing ``xs``, at ``x``: on the line through the nearest
    two, but below the first never less than in proportion to it, past the last never less
    than it. A steep line (two noisy
    measurements) fell to 0 there: a round of 2 points on 3 time slices was planned 24 times
    faster than the sequential sampler, and ran slower."""
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    line = max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    if x < xs[0]:
        return max(line, ys[0] * x / xs[0])
    return max(line, ys[-1]) if x > xs[-1] else line  # a falling last segment: not to 0


@dataclass(frozen=True)
class Profile:
    """One sampler setting measured on one rank: ``param`` is its window (windowed methods),
    block size (``piadm-*``) or 0 (sequential); ``rounds`` and ``calls`` (model calls per
    member) of a batch; host seconds per round ``host`` at ``host_points`` points (two
    measurements, increasing, to interpolate); ``collectives`` per round on several slices."""

    method: str
    param: int
    tol: float | None
    rounds: int
    calls: float
    host_points: tuple[int, ...]
    host: tuple[float, ...]
    collectives: int
    steps: int = 0  # the steps it ran when not the config's (at equal quality), else 0
    calls_by_size: tuple[tuple[int, int], ...] = ()  # (points, calls) of the member's calls
    host_batch: int = 1  # the members at which the host time's growth was measured
    host_growth: float = 1.0  # host time a round at host_batch members / at one
    batch_rounds: int = 0  # rounds of that batch (its slowest member's), 0: not measured

    def call_sizes(self) -> tuple[tuple[int, int], ...]:
        """(points, count) of one member's model calls: as measured, else ``rounds`` calls of
        the mean points."""
        return self.calls_by_size or ((math.ceil(self.points), self.rounds),)

    @property
    def points(self) -> float:
        """Mean points each member evaluates per round."""
        return self.calls / self.rounds

    def rounds_at(self, batch: int) -> int:
        """Rounds of a batch of ``batch`` members: its slowest member's, more than one
        member's (``rounds``) as the batch grows, up to the measured batch's, in log2 of the
        members between them and held past it."""
        if self.host_batch <= 1 or self.batch_rounds <= self.rounds or batch <= 1:
            return self.rounds
        share = min(1.0, math.log2(batch) / math.log2(self.host_batch))
        return round(self.rounds + share * (self.batch_rounds - self.rounds))

    def host_at(self, points: int, batch: int = 1) -> float:
        """Host seconds per round when a rank holds ``points`` points of ``batch`` members:
        linear in the members through the measured growth."""
        grow = 1.0
        if self.host_batch > 1:
            grow += (self.host_growth - 1) * (batch - 1) / (self.host_batch - 1)
        return _interp(self.host_points, self.host, points) * grow


@dataclass(frozen=True)
class Machine:
    """Where the job runs: ``ranks`` in all, ``ranks_per_node``, ``cores`` per node, torch
    ``threads`` per rank, ``latency`` seconds of one collective stage and the ``bandwidth`` of
    an Allgather into a rank, bytes a second."""

    ranks: int
    ranks_per_node: int
    cores: int
    threads: int
    latency: float
    bandwidth: float = DEFAULT_BANDWIDTH

    def stretch(self, busy_ranks: int) -> float:
        """How much longer busy time takes when ``busy_ranks`` ranks (of the job) want more of
        a node's cores than it has."""
        return max(1.0, min(busy_ranks, self.ranks_per_node) * self.threads / self.cores)


@dataclass(frozen=True)
class Layout:
    """One way to run: a sampler setting on ``groups`` x ``time_slices`` ranks, ``batch``
    members a batch."""

    method: str
    param: int
    groups: int
    time_slices: int
    batch: int
    replicated: bool = False  # every time slice keeps the whole window (sampler.window_split)


@dataclass(frozen=True)
class Prediction:
    """A layout's predicted ``seconds`` to fill the ensemble, from ``batches`` per group of
    ``rounds`` rounds of ``round_s`` seconds."""

    layout: Layout
    profile: Profile
    seconds: float
    batches: int
    round_s: float
    rounds: int = 0  # a batch's rounds (``Profile.rounds_at``)


@dataclass(frozen=True)
class Plan:
    """Every layout's prediction, fastest first, the best sequential one, and the machine."""

    ranked: list[Prediction]
    sequential: Prediction
    machine: Machine

    @property
    def best(self) -> Prediction:
        """The layout predicted fastest."""
        return self.ranked[0]


def call_items(layout: Layout, points: float) -> int:
    """Items of the widest model call a rank makes when each member evaluates ``points`` in a
    round: its slots' share of every member's, or an even share of all of them
    (replicated)."""
    t, b = layout.time_slices, layout.batch
    return math.ceil(points * b / t) if layout.replicated else math.ceil(points / t) * b


def predict(layout: Layout, profile: Profile, curve: CostCurve, machine: Machine,
            members: int, field_bytes: int = 0, items: int = 1) -> Prediction:
    """The time ``layout`` takes to sample ``members`` members of each of ``items`` items
    (see the module docstring) of ``field_bytes`` a field."""
    t, whole = layout.time_slices, layout.replicated
    host = profile.host_at(math.ceil(profile.points) if whole else math.ceil(profile.points / t),
                           layout.batch)
    batches = items * math.ceil(members / layout.batch)  # a batch holds one item's members
    stretch = machine.stretch(min(layout.groups, batches) * t)  # groups without work wait
    model_s = 0.0
    for size, count in profile.call_sizes():
        wall, busy = curve.at(call_items(layout, size))
        model_s += count * (wall + busy * (stretch - 1))
    stages = machine.latency * math.ceil(math.log2(t)) if t > 1 else 0.0
    comm = (1 if whole else profile.collectives) * stages
    if whole and t > 1:  # every rank receives the round's scores
        comm += math.ceil(profile.points) * layout.batch * field_bytes / machine.bandwidth
    # a batch's extra rounds (its slowest member's) add host work and collectives; its
    # members' points, and so its calls' items, are their own either way
    rounds = profile.rounds_at(layout.batch)
    round_s = model_s / rounds + host * stretch + comm
    per_group = math.ceil(batches / layout.groups)
    return Prediction(layout, profile, per_group * rounds * round_s, per_group, round_s, rounds)


def layouts(profiles: list[Profile], ranks: int, members: int, batches: tuple[int, ...],
            replicable: tuple[str, ...] = (), items: int = 1) -> list[tuple[Layout, Profile]]:
    """Every layout of ``ranks`` ranks for each profile: time slices a divisor of ``ranks``
    (one for a sequential sampler, at most its points per round), member batch sizes from
    ``batches`` up to the members of an item a group gets (of ``members`` of each of
    ``items``), and those that deal a group's share out in whole batches; on several slices, the methods named in ``replicable`` also with the whole
    window on every slice."""
    out = []
    for prof in profiles:
        for t in range(1, ranks + 1):
            if ranks % t or (prof.param == 0 and t > 1) or t > max(1, prof.param):
                continue
            groups = ranks // t
            most = max(1, min(members, math.ceil(items * members / groups)))
            # and the batches that deal a group's share out whole: 8 members on 3 groups
            # fill each once at 3 (powers of 2 gave 1 and 2: three or four batches a group)
            even = {most, min(most, math.ceil(members / groups))}
            for b in sorted(set(batches) | even):
                if b > most:
                    continue
                out.append((Layout(prof.method, prof.param, groups, t, b), prof))
                if t > 1 and prof.method in replicable:
                    out.append((Layout(prof.method, prof.param, groups, t, b, True), prof))
    return out


def rank(predictions: list[Prediction]) -> list[Prediction]:
    """Fastest first; ties go to fewer time slices, then larger batches (less to go wrong),
    then split windows (less memory)."""
    return sorted(predictions, key=lambda p: (round(p.seconds, 9), p.layout.time_slices,
                                              -p.layout.batch, p.layout.replicated))

"""Synchronisation points: every parallel sampler costs at most two buffer collectives a
round, pc-window's learned corrector included, and these tests fail when a sampler adds one
(or a pickled exchange)."""
import pytest
import torch

from models.grf import GaussianRandomField
from pipeline.comm import SerialComm
from pipeline.grids import make_grid
from pipeline.noise import Noise
from pipeline.samplers import REGISTRY, SAMPLERS, Options


class CountingComm:
    """A one-rank communicator that records the collectives a sampler calls, by name."""

    def __init__(self):
        self._inner, self.calls = SerialComm(), []
        self.rank, self.size, self.seconds = 0, 1, 0.0

    def __getattr__(self, name):
        method = getattr(self._inner, name)

        def counted(*args, **kwargs):
            self.calls.append(name)
            return method(*args, **kwargs)

        return counted

    def counts(self) -> dict:
        return {name: self.calls.count(name) for name in set(self.calls)}


def _run(method, **options):
    model = GaussianRandomField((8, 8))
    grid = make_grid("ou", 120, u_min=1e-3, u_max=10.0, block_size=30)
    noise = Noise(1, ((0, 0), (0, 1)), (8, 8), torch.float64)
    comm = CountingComm()
    _, stats = SAMPLERS[method](model, noise.prior(), grid, noise, comm=comm,
                                options=Options(data_bound=model.data_bound, **options))
    return comm.counts(), stats, len(grid.blocks)


@pytest.mark.parametrize("method", ["window", "window-ode", "pc-window", "pc-window-ode",
                                    "pc-window+secant"])
def test_a_window_round_is_one_allgather_and_one_allreduce(method):
    """The learned corrector's too: its secants ride in the round's Allreduce, its second
    scan in the first one's Allgather (``tests/test_mpi.py`` counts them on two ranks)."""
    method, _, theta = method.partition("+")
    counts, stats, _ = _run(method, window=24, tol=1e-3, **({"theta": theta} if theta else {}))
    assert stats.rounds > 5
    assert counts == {"allgather": stats.rounds, "allreduce_sum": stats.rounds}
    # what the planner counts a round (profiling.profile)
    assert sum(counts.values()) == REGISTRY[method].round_collectives() * stats.rounds


@pytest.mark.parametrize("method", [name for name, entry in REGISTRY.items() if entry.windowed])
def test_every_windowed_samplers_round_makes_the_collectives_it_registers(method):
    """Whatever the kinds, a window's round makes ``round_collectives`` (two), as the planner
    counts it: a sampler added to the registry is counted here without being listed."""
    tol = 1e-4 if REGISTRY[method].reference != "sequential-sde" else 1e-3
    counts, stats, _ = _run(method, window=24, tol=tol)
    assert stats.rounds > 5
    assert sum(counts.values()) == REGISTRY[method].round_collectives() * stats.rounds, counts


def test_a_picard_sweep_is_one_scan_and_one_residual_reduction():
    counts, stats, blocks = _run("piadm-sde", max_sweeps=8, tol=1e-3)
    # the block's end state is broadcast once per block, not per sweep
    assert counts == {"exscan_sum": stats.rounds, "allreduce_max": stats.rounds,
                      "bcast": blocks}


def test_a_picard_ode_round_is_at_most_two_scans():
    counts, stats, blocks = _run("piadm-ode", max_sweeps=5, corrector_sweeps=3)
    block_sweeps, corrector_sweeps = 5 * blocks, 3 * blocks
    assert stats.rounds == block_sweeps + corrector_sweeps
    # a block sweep: its scan and its residual; a corrector sweep: the velocity and the
    # position scans; one end-state broadcast after each block and each corrector
    assert counts == {"exscan_sum": block_sweeps + 2 * corrector_sweeps,
                      "allreduce_max": block_sweeps, "bcast": 2 * blocks}

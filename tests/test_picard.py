import math

import pytest
import torch

from models.grf import GaussianRandomField
from pipeline.comm import SerialComm
from pipeline.grids import make_grid
from pipeline.noise import Noise
from pipeline.samplers import SAMPLERS, Options, PicardDivergence


def _setup(shape=(12, 10), steps=48, block=12, members=3):
    model = GaussianRandomField(shape)
    grid = make_grid("ou", steps, u_min=1e-3, u_max=10.0, block_size=block)
    noise = Noise(7, tuple((0, m) for m in range(members)), shape, torch.float64)
    return model, grid, noise, noise.prior()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method,ref", [("piadm-sde", "sequential-sde"), ("piadm-ode", "sequential-ode")])
@pytest.mark.parametrize("form", ["exponential", "eps"])
def test_picard_with_block_size_sweeps_equals_sequential(method, ref, form):
    model, grid, noise, y0 = _setup()
    opts = Options(form=form, max_sweeps=12, corrector_steps=0)
    y, stats = SAMPLERS[method](model, y0, grid, noise, comm=SerialComm(), options=opts)
    y_ref, _ = SAMPLERS[ref](model, y0, grid, noise, comm=SerialComm(), options=opts)
    assert _rel(y, y_ref) <= 1e-10
    assert stats.rounds == 48 and stats.sweeps == (12,) * 4


def test_picard_error_shrinks_with_sweeps():
    model, grid, noise, y0 = _setup()
    y_ref, _ = SAMPLERS["sequential-sde"](model, y0, grid, noise, comm=SerialComm())
    errs = [_rel(SAMPLERS["piadm-sde"](model, y0, grid, noise,
                                       comm=SerialComm(), options=Options(max_sweeps=k))[0], y_ref)
            for k in (4, 7, 10)]
    assert errs[0] > errs[1] > errs[2]


def test_tolerance_stops_early_and_stays_close():
    model, grid, noise, y0 = _setup(steps=200, block=40)
    y_ref, _ = SAMPLERS["sequential-sde"](model, y0, grid, noise, comm=SerialComm())
    y, stats = SAMPLERS["piadm-sde"](model, y0, grid, noise,
                                     comm=SerialComm(), options=Options(max_sweeps=40, tol=0.01))
    assert stats.rounds < 200
    assert _rel(y, y_ref) < 1e-3


def test_blocks_that_reach_max_sweeps_above_the_tolerance_are_counted():
    """A block stopped by max_sweeps short of its points, its residual still above tol, may
    leave its members further from the sequential path than tol allows: counted, so that the
    commands warn. Not counted without a tol, nor where max_sweeps reaches the block's
    points (exact), nor once the block settled."""
    model, grid, noise, y0 = _setup(steps=48, block=8)
    count = {}
    for name, opts in {"short": Options(max_sweeps=2, tol=1e-12),
                       "no tol": Options(max_sweeps=2),
                       "exact": Options(max_sweeps=8, tol=1e-12),
                       "settled": Options(max_sweeps=8, tol=0.5)}.items():
        _, stats = SAMPLERS["piadm-sde"](model, y0, grid, noise, comm=SerialComm(),
                                         options=opts)
        count[name] = (stats.unsettled, stats.rounds)
    assert count["short"] == (6, 12)
    assert count["no tol"][0] == count["exact"][0] == 0
    assert count["settled"][0] == 0 and count["settled"][1] < 48


def test_float32_parity_within_roundoff():
    model = GaussianRandomField((16, 16))
    grid = make_grid("ou", 40, u_min=1e-3, u_max=10.0, block_size=10)
    noise = Noise(1, ((0, 0),), (16, 16), torch.float32)
    y0 = noise.prior()
    y, _ = SAMPLERS["piadm-sde"](model, y0, grid, noise,
                                 comm=SerialComm(), options=Options(max_sweeps=10))
    y_ref, _ = SAMPLERS["sequential-sde"](model, y0, grid, noise, comm=SerialComm())
    assert _rel(y, y_ref) <= 1e-5


class _Exploding:
    """A score that returns NaN for states far from the origin: Picard's first sweeps visit them."""

    def __init__(self, inner):
        self.inner, self.shape = inner, inner.shape

    def __call__(self, x, u):
        s = self.inner(x, u)
        big = x.flatten(1).abs().amax(1) > 1e3
        s[big] = math.nan
        return s


@pytest.mark.parametrize("u_max,steps", [(20.0, 7), (40.0, 7), (40.0, 100)])
def test_float32_blocks_that_span_a_large_growth_stay_on_the_path(u_max, steps):
    """y_m = E_m (y0 + sum b_j / E_{j+1}) keeps y_m / E_m beside y0: across a growth E of
    e^20 float32 kept no digit of it, and the ODE (its score nearly cancels the growth) ended
    1.0 from its path. Such a block sums in float64; the usual ones keep float32, bit for bit
    as before (the default grid's whole path grows by e^5)."""
    from pipeline.samplers.picard import scan_dtype

    model = GaussianRandomField((8, 8))
    grid = make_grid("ou", steps, u_min=1e-3, u_max=u_max, block_size=steps)
    noise, wide = (Noise(3, tuple((0, m) for m in range(4)), (8, 8), dtype)
                   for dtype in (torch.float32, torch.float64))
    opts = Options(max_sweeps=steps, corrector_steps=0, divergence_threshold=1e30)
    y, _ = SAMPLERS["piadm-ode"](model, noise.prior(), grid, noise, comm=SerialComm(),
                                 options=opts)
    ref, _ = SAMPLERS["sequential-ode"](model, wide.prior(), grid, wide, comm=SerialComm(),
                                        options=opts)
    assert _rel(y.double(), ref) < 1e-4
    e = torch.exp(torch.tensor([0.0, 5.0], dtype=torch.float64))  # u_max = 10 to 0: e^5
    assert scan_dtype(e, torch.float32) == torch.float32
    assert scan_dtype(e * torch.tensor([1.0, 2.0], dtype=torch.float64),
                      torch.float32) == torch.float64


def test_divergence_raises_or_falls_back_to_sequential():
    model, grid, noise, y0 = _setup()
    bad = _Exploding(model)
    huge = y0 * 1e3  # first sweep sees 1e3-scale states -> NaN residual
    with pytest.raises(PicardDivergence, match="block_size"):
        SAMPLERS["piadm-sde"](bad, huge, grid, noise,
                              comm=SerialComm(), options=Options(on_divergence="error"))


def test_fallback_gives_sequential_result():
    model, grid, noise, y0 = _setup()
    y_ref, _ = SAMPLERS["sequential-sde"](model, y0, grid, noise, comm=SerialComm())
    opts = Options(max_sweeps=3, divergence_threshold=1e-30)  # every block "diverges"
    y, stats = SAMPLERS["piadm-sde"](model, y0, grid, noise, comm=SerialComm(), options=opts)
    assert stats.fallbacks == 4
    assert _rel(y, y_ref) <= 1e-10
    # flagged at the first sweep, whose first state is exact: each redo runs the other 11
    assert stats.rounds == 4 * (1 + 11)


def test_a_block_whose_transient_trips_the_threshold_takes_no_more_rounds_than_steps():
    """A 60-step block's Picard iterates grow past 1e8 before they settle (the SDE's residual
    is scaled by e^h - 1); the redo starts after the states already exact, so the block costs
    at most its steps, and still lands on the sequential path."""
    model = GaussianRandomField((8, 8))
    grid = make_grid("ou", 60, u_min=1e-3, u_max=10.0, block_size=60)
    noise = Noise(0, tuple((0, m) for m in range(4)), (8, 8), torch.float64)
    y, stats = SAMPLERS["piadm-sde"](model, noise.prior(), grid, noise,
                                     comm=SerialComm(), options=Options(tol=1e-4))
    ref, _ = SAMPLERS["sequential-sde"](model, noise.prior(), grid, noise, comm=SerialComm())
    assert stats.fallbacks == 1 and stats.rounds <= 60
    assert _rel(y, ref) <= 1e-12


def test_members_diverging_at_different_sweeps_take_no_more_rounds_than_steps():
    """A block's members trip the threshold at different sweeps, and the others sweep on:
    redone after the whole block's sweeps, from the earliest of their exact states, a block
    of 7 steps took 8 rounds (of 50, 51). Each is now stepped on from its own exact state
    beside the others' sweeps, in the same calls, and ends by round 7."""
    model = GaussianRandomField((8, 8))
    grid = make_grid("ou", 7, u_min=1e-3, u_max=10.0, block_size=7)
    noise = Noise(0, tuple((0, m) for m in range(64)), (8, 8), torch.float32)
    y, stats = SAMPLERS["piadm-sde"](model, noise.prior(), grid, noise, comm=SerialComm(),
                                     options=Options(tol=1e-3))
    ref, _ = SAMPLERS["sequential-sde"](model, noise.prior(), grid, noise, comm=SerialComm())
    assert stats.fallbacks == 1 and stats.sweeps == (3,)  # some swept on past the first
    assert stats.rounds == 7
    assert _rel(y, ref) < 1e-5


class _Faults:
    """The GRF's score but on its first two calls: a huge score at member 1's last point on
    the first (its sweep 1 trips the threshold, its first state exact), and on the second a
    NaN at member 0's second point (its states from there on are NaN: it restarts from the
    block start) and a huge score at member 2's last point (its first two states exact)."""

    def __init__(self, model, m: int):
        self.model, self.shape, self.m, self.calls = model, model.shape, m, 0

    def __call__(self, x, u):
        s = self.model(x, u).clone()
        self.calls += 1
        if self.calls == 1:
            s[2 * self.m - 1] = 1e12
        if self.calls == 2:
            s[1] = math.nan
            s[2 * self.m - 1] = s[3 * self.m - 1] = 1e12
        return s


def test_members_redone_from_different_steps_each_take_their_own_step():
    """Members redone from different steps (one restarted at the block start, where its
    state was not finite) were each given the first one's step coefficients, and a member
    flagged beside one with a non-finite state restarted from the block start with it."""
    model = GaussianRandomField((8, 8))
    grid = make_grid("ou", 7, u_min=1e-3, u_max=1.0, block_size=7)
    noise = Noise(0, tuple((0, m) for m in range(4)), (8, 8), torch.float64)
    y, stats = SAMPLERS["piadm-sde"](_Faults(model, 7), noise.prior(), grid, noise,
                                     comm=SerialComm(), options=Options())
    ref, _ = SAMPLERS["sequential-sde"](model, noise.prior(), grid, noise, comm=SerialComm())
    gaps = (y - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)
    assert float(gaps.max()) < 1e-12, gaps
    assert stats.fallbacks == 1 and stats.rounds == 2 + 7  # member 0 from step 0 at round 3


def test_denoise_final_is_tweedie_mean_of_the_end_state():
    model, grid, noise, y0 = _setup()
    y, s = SAMPLERS["piadm-sde"](model, y0, grid, noise,
                                 comm=SerialComm(), options=Options(max_sweeps=12))
    yd, sd = SAMPLERS["piadm-sde"](model, y0, grid, noise,
                                   comm=SerialComm(),
                                   options=Options(max_sweeps=12, denoise_final=True))
    u = torch.full((y.shape[0],), 1e-3, dtype=torch.float64)
    a, s2 = math.exp(-0.5e-3), -math.expm1(-1e-3)
    assert torch.allclose(yd, (y + s2 * model(y, u)) / a, rtol=1e-12, atol=1e-12)
    assert sd.rounds == s.rounds + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 65, 32, 32), (2, 9, 5, 7), (2, 0, 4)])
def test_point_cumsum_is_torch_cumsum_bit_for_bit(shape, dtype):
    """The prefix sums of the block and window samplers: a faster scan, the same numbers."""
    from pipeline.samplers.common import point_cumsum

    w = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    assert torch.equal(point_cumsum(w), torch.cumsum(w, 1))

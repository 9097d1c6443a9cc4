import torch

from models.grf import GaussianRandomField
from pipeline.comm import SerialComm
from pipeline.grids import make_grid
from pipeline.noise import Noise
from pipeline.samplers import SAMPLERS, Options


def _setup():
    model = GaussianRandomField((10, 10))
    grid = make_grid("ou", 80, u_min=1e-3, u_max=10.0, block_size=80)
    noise = Noise(3, ((0, 0), (0, 1)), (10, 10), torch.float64)
    return model, grid, noise, noise.prior()


def test_zero_tolerance_window_is_sequential():
    model, grid, noise, y0 = _setup()
    for method, ref in [("window", "sequential-sde"), ("window-ode", "sequential-ode")]:
        y, stats = SAMPLERS[method](model, y0, grid, noise,
                                    comm=SerialComm(), options=Options(window=10, tol=0.0))
        y_ref, _ = SAMPLERS[ref](model, y0, grid, noise, comm=SerialComm())
        assert float((y - y_ref).norm() / y_ref.norm()) <= 1e-10
        assert stats.rounds == 80


def test_window_with_tolerance_advances_faster_and_stays_close():
    model, grid, noise, y0 = _setup()
    y_ref, _ = SAMPLERS["sequential-sde"](model, y0, grid, noise, comm=SerialComm())
    y, stats = SAMPLERS["window"](model, y0, grid, noise,
                                  comm=SerialComm(), options=Options(window=20, tol=0.01))
    assert stats.rounds < 60
    assert float((y - y_ref).norm() / y_ref.norm()) < 1e-2


def test_window_per_member_result_independent_of_batch():
    model, grid, noise, y0 = _setup()
    opts = Options(window=20, tol=0.05)
    y_both, _ = SAMPLERS["window"](model, y0, grid, noise, comm=SerialComm(), options=opts)
    one = noise.subset([1])
    y_one, _ = SAMPLERS["window"](model, one.prior(), grid, one, comm=SerialComm(), options=opts)
    assert torch.equal(y_both[1], y_one[0])


def test_a_model_that_returns_nan_stops_the_window_naming_the_step_and_the_model():
    import pytest

    from pipeline.samplers import PicardDivergence

    model, grid, noise, y0 = _setup()

    def broken(x, u):
        out = model(x, u)
        return torch.where(u.reshape(-1, *(1,) * (out.dim() - 1)) < 0.5, torch.nan, out)

    # its first NaN state follows step 49's call, the grid's first u < 0.5 (it named the start
    # of its window, 0 for a network failing late in its path)
    assert int((grid.u < 0.5).nonzero()[0]) == 49
    with pytest.raises(PicardDivergence, match=r"went NaN/Inf near step 50: the model returns "
                                               r"non-finite scores there"):
        SAMPLERS["window"](broken, y0, grid, noise,
                           comm=SerialComm(), options=Options(window=20, tol=0.01))


def test_a_far_guess_growing_round_after_round_leaks_nothing_into_accepted_points():
    """On long steps (h > 2 ln 2) the window's far guesses grow each round; its prefix sum
    took a point's offset as its inclusive sum less its own term, which rounds that term's
    size into it: float32 ended 1.03 from the sequential path (30 steps from u_max = 40)."""
    model = GaussianRandomField((8, 8))
    grid = make_grid("ou", 30, u_min=1e-3, u_max=40.0, block_size=30)
    noise = Noise(0, tuple((0, m) for m in range(4)), (8, 8), torch.float32)
    y, _ = SAMPLERS["window"](model, noise.prior(), grid, noise,
                              comm=SerialComm(), options=Options(tol=1e-2, window=2))
    ref, _ = SAMPLERS["sequential-sde"](model, noise.prior(), grid, noise, comm=SerialComm())
    assert float((y - ref).norm() / ref.norm()) < 1e-5

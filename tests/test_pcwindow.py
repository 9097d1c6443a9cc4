"""pc-window: the work-efficient window reproduces the sequential path, certifies what it
accepts, and its ring maths gives every rank the right prefix."""
import math

import numpy as np
import pytest
import torch

from models.gmm import GaussianMixture
from models.grf import GaussianRandomField
from pipeline.comm import SerialComm
from pipeline.decomposition import slice_bounds
from pipeline.grids import make_grid
from pipeline.integrators import step_coefficients
from pipeline.noise import Noise
from pipeline.samplers import SAMPLERS, Options, PicardDivergence
from pipeline.samplers import pcwindow, secant, secant_rebuild
from pipeline.samplers.pcwindow import accept, lipschitz, tables
from pipeline.samplers.predictor import denoiser_nodes, lagrange_weights, predict
from pipeline.samplers.ring import before, chain_index, run_starts


def _setup(shape=(10, 10), steps=120, members=3, seed=3):
    model = GaussianRandomField(shape)
    grid = make_grid("ou", steps, u_min=1e-3, u_max=10.0, block_size=steps)
    noise = Noise(seed, tuple((0, m) for m in range(members)), shape, torch.float64)
    return model, grid, noise, noise.prior()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method,ref", [("pc-window", "sequential-sde"),
                                        ("pc-window-ode", "sequential-ode")])
@pytest.mark.parametrize("form", ["exponential", "eps"])
def test_zero_tolerance_is_the_sequential_sampler(method, ref, form):
    model, grid, noise, y0 = _setup()
    opts = Options(form=form, window=16, tol=0.0, data_bound=model.data_bound)
    y, stats = SAMPLERS[method](model, y0, grid, noise, comm=SerialComm(), options=opts)
    y_ref, _ = SAMPLERS[ref](model, y0, grid, noise, comm=SerialComm(), options=opts)
    assert _rel(y, y_ref) <= 1e-12
    # a point is certified only when nothing before it moved: about one per round
    assert grid.steps * 0.9 <= stats.rounds <= grid.steps


@pytest.mark.parametrize("steps", [4, 11])
def test_a_coarse_grid_where_steps_contract_past_zero_still_converges(steps):
    """Steps so long that J_max <= 0 (no positive theta is exact there): theta stays within
    the float range the rebuild's products allow, and the window is still the sequential
    sampler at tol 0 and finite at a loose tol."""
    model, grid, noise, y0 = _setup(steps=steps)
    st = step_coefficients(grid.u, stochastic=True)
    u = grid.u[:-1]
    assert float((st.decay - st.drift / (torch.exp(-u) * model.data_bound
                                         - torch.expm1(-u))).min()) < 0
    y_ref, _ = SAMPLERS["sequential-sde"](model, y0, grid, noise, comm=SerialComm())
    for tol in (0.0, 0.1):
        opts = Options(tol=tol, data_bound=model.data_bound)
        y, stats = SAMPLERS["pc-window"](model, y0, grid, noise, comm=SerialComm(), options=opts)
        assert bool(torch.isfinite(y).all()) and stats.rounds <= steps
        if tol == 0.0:
            assert _rel(y, y_ref) <= 1e-12


def test_tolerance_trades_distance_for_rounds_and_the_window_bounds_the_work():
    model, grid, noise, y0 = _setup(steps=300)
    y_ref, _ = SAMPLERS["sequential-sde"](model, y0, grid, noise, comm=SerialComm())
    runs = {tol: SAMPLERS["pc-window"](model, y0, grid, noise, comm=SerialComm(), options=Options(
        window=40, tol=tol, data_bound=model.data_bound)) for tol in (1e-2, 1e-3, 1e-4)}
    dist = {tol: _rel(y, y_ref) for tol, (y, _) in runs.items()}
    rounds = {tol: s.rounds for tol, (_, s) in runs.items()}
    assert dist[1e-4] < dist[1e-3] < dist[1e-2] < 0.05
    assert rounds[1e-2] < rounds[1e-3] < rounds[1e-4] < 0.3 * grid.steps
    for _, stats in runs.values():
        assert stats.model_calls <= 40 * stats.rounds  # never more than a window per round
        assert stats.model_calls >= grid.steps  # every step evaluated at least once


def test_each_member_is_independent_of_its_batch():
    model, grid, noise, y0 = _setup(steps=200, members=4)
    opts = Options(window=30, tol=1e-3, data_bound=model.data_bound)
    y, _ = SAMPLERS["pc-window"](model, y0, grid, noise, comm=SerialComm(), options=opts)
    for k in (0, 3):
        one = noise.subset([k])
        y_one, _ = SAMPLERS["pc-window"](model, one.prior(), grid, one,
                                         comm=SerialComm(), options=opts)
        assert torch.equal(y_one[0], y[k])


def test_certified_bound_covers_the_true_error_of_every_accepted_point():
    """Run rounds by hand from a known start: Yhat_{n+1} = theta_n Yhat_n + Phi_n(Y_n) -
    theta_n Y_n with theta = J_max, and E_{n+1} = theta_n E_n + L_n delta_n bounds its real
    error; the sampler's own rebuild and acceptance compute exactly these."""
    model, grid, noise, y0 = _setup(steps=80, members=1)
    steps = step_coefficients(grid.u, stochastic=True)
    t = tables(grid, steps, model.data_bound, 40)
    u = grid.u[:-1]
    v0 = -torch.expm1(-u)
    theta = steps.decay - steps.drift / (torch.exp(-u) * model.data_bound + v0)
    xi = noise.path(0, 80)
    exact = [y0]
    for k in range(40):  # the sequential path, the truth for the window's first 40 points
        g = model(exact[-1], grid.u[k : k + 1])
        exact.append(steps.decay[k] * exact[-1] + steps.drift[k] * g + steps.noise[k] * xi[:, k])
    start, width = np.zeros(1, dtype=np.int64), np.array([40])
    pos = np.arange(40)[None]
    guess, _ = predict(y0, torch.zeros_like(y0), start, torch.tensor([40]), t, noise, 80)
    guess = guess[:, :40]
    for _ in range(3):  # three rounds on the same window (no sliding)
        g = model(guess[0], grid.u[:40])[None]
        new = [y0[0]]
        for k in range(40):
            phi = (steps.decay[k] * guess[0, k] + steps.drift[k] * g[0, k]
                   + steps.noise[k] * xi[0, k])
            new.append(theta[k] * new[-1] + phi - theta[k] * guess[0, k])
        new = torch.stack(new)[None]
        delta = ((new[:, :40] - guess) ** 2).flatten(2).mean(-1).sqrt()
        bound = [0.0, 0.0]  # Y_b is exact, so its change adds nothing
        for k in range(1, 40):
            bound.append(float(theta[k]) * bound[-1] + float(t.lipschitz[k] * delta[0, k]))
        bound = torch.tensor(bound, dtype=torch.float64)
        true = torch.stack([((new[0, c] - exact[c]) ** 2).mean().sqrt() for c in range(41)])
        assert bool((true <= bound + 1e-12).all()), (true - bound).max()
        # the sampler's rebuild: one prefix sum scaled by the products of theta
        prefix, y_e, _ = pcwindow._rebuild(guess, g, xi[:, :40], start, width, pos,
                                           np.ones((1, 40), dtype=bool), np.full((1, 1), -1),
                                           t, 40, [(0, 40)], SerialComm())
        assert torch.allclose(prefix, new[:, :40], rtol=1e-12, atol=1e-12)
        assert torch.allclose(y_e, new[:, 40], rtol=1e-12, atol=1e-12)
        for c in (2, 17, 40):  # its certified bound, read where it accepts everything
            _, got = accept(delta, torch.zeros(1, 41, dtype=torch.float64), start,
                            np.array([c]), t, float("inf"), True)
            assert math.isclose(float(got[0]) * float(t.noise[c - 1]), float(bound[c]),
                                rel_tol=1e-12)
        guess = new[:, :40]


def test_theta_one_lags_the_whole_step_and_both_reach_the_sequential_path():
    model, grid, noise, y0 = _setup(steps=200, members=2)
    steps = step_coefficients(grid.u, stochastic=True)
    one = tables(grid, steps, model.data_bound, 30, "one")
    assert one.growth is None and np.array_equal(one.increment[:200, 0],
                                                 (steps.decay - 1).numpy())
    y_ref, _ = SAMPLERS["sequential-sde"](model, y0, grid, noise, comm=SerialComm())
    for theta in ("j_max", "one"):
        opts = Options(window=30, tol=0.0, theta=theta, data_bound=model.data_bound)
        y, _ = SAMPLERS["pc-window"](model, y0, grid, noise, comm=SerialComm(), options=opts)
        assert _rel(y, y_ref) <= 1e-12
    with pytest.raises(ValueError, match="theta = 'max'"):
        tables(grid, steps, model.data_bound, 30, "max")


def test_the_predictor_steps_each_row_as_far_as_it_needs_and_no_further():
    model, grid, noise, y0 = _setup(steps=80, members=2)
    steps = step_coefficients(grid.u, stochastic=True)
    t = tables(grid, steps, model.data_bound, 20)
    start, x0 = torch.tensor([5, 30]), torch.zeros_like(y0)
    states, xi = predict(y0, x0, start, torch.tensor([3, -1]), t, noise, 80)
    assert states.shape[:2] == (2, 4) and torch.equal(states[:, 0], y0)
    y = y0[0]  # row 0 by hand: Psi_j with the denoiser frozen at zero
    for j in range(3):
        y = float(t.alpha[5 + j]) * y + float(t.noise[5 + j]) * noise.path(5 + j, 6 + j, [0])[0, 0]
        assert torch.allclose(states[0, j + 1], y, rtol=0, atol=1e-12)
    assert not xi[1].any()  # row 1 needs no point: no noise drawn for it
    none, _ = predict(y0, x0, start, torch.tensor([-1, -1]), t, noise, 80)
    assert none.shape[:2] == (2, 0)


@pytest.mark.parametrize("stochastic", [True, False])
def test_the_predictor_is_psi_step_by_step_with_the_denoiser_frozen(stochastic):
    model, grid, noise, y0 = _setup(steps=80, members=2)
    t = tables(grid, step_coefficients(grid.u, stochastic=stochastic), model.data_bound, 30)
    start, x0 = torch.tensor([7, 41]), torch.randn_like(y0)
    step_noise = noise if stochastic else None
    states, xi = predict(y0, x0, start, torch.tensor([25, 12]), t, step_noise, 80)
    for r, depth in ((0, 25), (1, 12)):
        y = y0[r]
        for j in range(depth):
            k = int(start[r]) + j
            drawn = noise.path(k, k + 1, [r])[0, 0] if stochastic else torch.zeros_like(y)
            y = float(t.alpha[k]) * y + float(t.beta[k]) * x0[r] + float(t.noise[k]) * drawn
            assert torch.allclose(states[r, j + 1], y, rtol=1e-12, atol=1e-12)
            assert torch.equal(xi[r, j], drawn)
    # a row's points do not depend on how far the other rows go
    one = noise.subset([1]) if stochastic else None
    alone, _ = predict(y0[1:], x0[1:], start[1:], torch.tensor([12]), t, one, 80)
    assert torch.equal(alone[0], states[1, :13])


def test_lagrange_weights_extrapolate_a_polynomial_of_their_degree_exactly():
    quad = lambda x: 1.5 - 2 * x + 0.7 * x**2  # noqa: E731
    line = lambda x: 0.3 + 4 * x  # noqa: E731
    nan = float("nan")
    at = np.array([[1.9, 0.4, -2.0]] * 4)
    w = lagrange_weights(np.array([[2.0, 2.5, 3.0], [1.0, nan, 4.0], [nan, 7.0, nan],
                                   [nan, nan, nan]]), at)
    assert w.shape == (4, 3, 3)
    for j, x in enumerate(at[0]):
        assert abs(sum(w[0, j, i] * quad(n) for i, n in enumerate([2.0, 2.5, 3.0]))
                   - quad(x)) < 1e-10
        assert w[1, j, 1] == 0  # the missing node weighs nothing; a line through the other two
        assert abs(w[1, j, 0] * line(1.0) + w[1, j, 2] * line(4.0) - line(x)) < 1e-12
    assert w[2].tolist() == [[0.0, 1.0, 0.0]] * 3  # one node: the value frozen
    assert not w[3].any()
    # a row's weights do not depend on the other rows
    assert np.array_equal(lagrange_weights(np.array([[1.0, nan, 4.0]]), at[:1])[0], w[1])


def test_denoiser_nodes_are_the_last_point_and_every_lag_th_before_it_inside_the_window():
    nodes = denoiser_nodes(torch.tensor([10, 10, 10, 50]), torch.tensor([20, 12, 5, 0]), 3, 8)
    assert nodes.tolist() == [[29, 21, 13], [21, 13, -1], [14, -1, -1], [-1, -1, -1]]


def test_the_predictor_follows_psi_with_the_denoiser_extrapolated_through_its_nodes():
    model, grid, noise, y0 = _setup(steps=80, members=2)
    t = tables(grid, step_coefficients(grid.u, stochastic=False), model.data_bound, 30)
    start, x0 = torch.tensor([20, 41]), torch.randn((2, 3, *y0.shape[1:]), dtype=y0.dtype)
    nodes = torch.from_numpy(t.u[[[19, 11, 3], [40, 32, 24]]])
    nodes[1, 2] = float("nan")  # row 1 has two nodes: a line
    states, _ = predict(y0, x0, start, torch.tensor([25, 12]), t, None, 80, nodes)
    for r, depth in ((0, 25), (1, 12)):
        y, kept = y0[r], torch.isfinite(nodes[r])
        for j in range(depth):
            k = int(start[r]) + j
            u = float(t.u[k])
            # the denoiser at u: the polynomial through (nodes, x0) evaluated by Lagrange's rule
            x0hat = torch.zeros_like(y)
            for i in torch.nonzero(kept).flatten().tolist():
                others = [float(nodes[r, m]) for m in torch.nonzero(kept).flatten().tolist()
                          if m != i]
                weight = math.prod((u - o) / (float(nodes[r, i]) - o) for o in others)
                x0hat += weight * x0[r, i]
            y = float(t.alpha[k]) * y + float(t.beta[k]) * x0hat
            assert torch.allclose(states[r, j + 1], y, rtol=1e-12, atol=1e-12)


def test_extrapolating_the_denoiser_saves_the_ode_window_calls_at_no_larger_distance(monkeypatch):
    model, grid, noise, y0 = _setup(shape=(16, 16), steps=400, members=2)
    y_ref, _ = SAMPLERS["sequential-ode"](model, y0, grid, noise, comm=SerialComm())
    opts = Options(tol=1e-5, data_bound=model.data_bound)
    y, stats = SAMPLERS["pc-window-ode"](model, y0, grid, noise, comm=SerialComm(), options=opts)
    monkeypatch.setattr(pcwindow, "ODE_TERMS", 1)  # the denoiser frozen, as the SDE's predictor
    y_frozen, frozen = SAMPLERS["pc-window-ode"](model, y0, grid, noise,
                                                 comm=SerialComm(), options=opts)
    assert stats.model_calls <= 0.9 * frozen.model_calls and stats.rounds < frozen.rounds
    assert _rel(y, y_ref) <= _rel(y_frozen, y_ref) <= 1e-3


def test_lipschitz_bound_covers_every_eigenvalue_and_tightens_with_s():
    grid = make_grid("ou", 50, u_min=1e-3, u_max=10.0, block_size=50)
    u = grid.u[:-1]
    for stochastic in (True, False):
        steps = step_coefficients(grid.u, stochastic=stochastic)
        for bound in (0.5, 4.0, 300.0):
            lip = lipschitz(steps, u, bound)
            v0, vs = -torch.expm1(-u), torch.exp(-u) * bound - torch.expm1(-u)
            for frac in torch.linspace(0, 1, 11, dtype=torch.float64):
                lam = 1 / vs + frac * (1 / v0 - 1 / vs)  # an eigenvalue of -J_s in range
                jac = (steps.decay - 1 - steps.drift * lam).abs()
                assert bool((jac <= lip + 1e-15).all())
        safe = lipschitz(steps, u, float("inf"))
        assert bool((safe >= lipschitz(steps, u, 4.0) - 1e-15).all())


def test_accept_takes_the_certified_prefix_and_at_least_one_point():
    grid = make_grid("ou", 20, u_min=1e-3, u_max=10.0, block_size=20)
    steps = step_coefficients(grid.u, stochastic=True)
    t = tables(grid, steps, 1.0, 8)
    start, width = torch.tensor([0, 0, 3]), torch.tensor([8, 8, 0])
    delta = torch.zeros(3, 8, dtype=torch.float64)
    delta[0, 5] = 1.0  # point 5 is wrong: points up to 5 are certified, 6 is not
    delta[1, 1] = float("nan")  # a NaN change certifies nothing past the exact first point
    accepted, _ = accept(delta, torch.zeros(3, 9, dtype=torch.float64), start, width, t, 1e-3,
                         True)
    assert accepted.tolist() == [5, 1, 0]


def test_ring_runs_give_each_slot_the_prefix_of_the_points_before_it():
    """With p slots over R ranks and any window start, summing the totals of the runs that
    precede a rank's run, plus its own partial sums, is the plain prefix in position order."""
    for p in (1, 5, 13):
        for ranks in range(1, min(p, 5) + 1):
            bounds = [slice_bounds(p, ranks, r) for r in range(ranks)]
            for b in range(0, 2 * p + 1):
                start = torch.tensor([b])
                values = {c: float(2**c) for c in range(p)}  # the value at chain index c
                starts = run_starts(bounds, start, p)
                for r, (lo, hi) in enumerate(bounds):
                    chain = chain_index(lo, hi, start, p)[0]
                    prec = before(starts, r)[0]  # (2, ranks, 2)
                    totals = np.zeros((ranks, 2))
                    for q, (qlo, qhi) in enumerate(bounds):
                        for s, c in zip(range(qlo, qhi), chain_index(qlo, qhi, start, p)[0]):
                            totals[q, 0 if s >= b % p else 1] += values[int(c)]
                    for s, c in zip(range(lo, hi), chain.tolist()):
                        kind = 0 if s >= b % p else 1
                        own = sum(values[int(cc)] for ss, cc in zip(range(lo, hi), chain)
                                  if (0 if ss >= b % p else 1) == kind and cc < c)
                        got = float((prec[kind] * totals).sum()) + own
                        assert got == sum(values[k] for k in range(c)), (p, ranks, b, r, s)


def test_exactness_on_a_gaussian_mixture_keeps_the_mode_weights():
    model = GaussianMixture.random((8,), components=3, weights=[0.5, 0.3, 0.2], seed=1)
    grid = make_grid("ou", 200, u_min=1e-3, u_max=10.0, block_size=40)
    n = 400
    noise = Noise(5, tuple((0, m) for m in range(n)), (8,), torch.float64)
    from models.gmm import mode_fractions

    y, _ = SAMPLERS["pc-window"](model, noise.prior(), grid, noise,
                                 comm=SerialComm(),
                                 options=Options(window=40, tol=1e-3, data_bound=model.data_bound))
    frac = mode_fractions(model, y, 1e-3)
    se = torch.sqrt(model.weights * (1 - model.weights) / n)
    assert bool(((frac - model.weights).abs() <= 3 * se).all()), (frac, model.weights)


def test_ode_variant_matches_the_sequential_ode_within_1e_3():
    model, grid, noise, y0 = _setup(shape=(16, 16), steps=400, members=2)
    y_ref, _ = SAMPLERS["sequential-ode"](model, y0, grid, noise, comm=SerialComm())
    # the ODE's tolerance is absolute plus relative per point (no step noise to scale by)
    y, stats = SAMPLERS["pc-window-ode"](model, y0, grid, noise,
                                         comm=SerialComm(),
                                         options=Options(tol=1e-5, data_bound=model.data_bound))
    assert _rel(y, y_ref) <= 1e-3 and stats.rounds < grid.steps / 4


def test_a_model_that_returns_nan_stops_with_the_member_and_step():
    model, grid, noise, y0 = _setup(steps=60, members=2)

    def broken(x, u):
        out = model(x, u)
        return torch.where(u.reshape(-1, 1, 1) < 0.5, torch.nan, out)

    with pytest.raises(PicardDivergence, match=r"member \d of item 0 went NaN/Inf by step \d+"):
        SAMPLERS["pc-window"](broken, y0, grid, noise, comm=SerialComm(), options=Options(tol=1e-3))


def test_data_bounds_are_exact_for_the_gaussian_models():
    grf = GaussianRandomField((8, 6))
    assert math.isclose(grf.data_bound, float(grf.spectrum.max()))
    gmm = GaussianMixture.random((5,), components=3, weights=[0.5, 0.3, 0.2], seed=2)
    x, _ = gmm.sample(400_000, 0)
    cov = torch.cov(x.T)
    assert math.isclose(gmm.data_bound, float(torch.linalg.eigvalsh(cov).max()), rel_tol=0.02)


def test_a_host_mask_is_moved_to_the_fields_device_and_shaped_to_broadcast():
    # the samplers keep their bookkeeping (window starts, masks) on the host; a mask that meets
    # the fields must follow them to their device ("meta" stands in for a GPU here)
    from pipeline.samplers.common import point_mask
    fields = torch.empty((2, 5, 8, 8), device="meta")
    mask = point_mask(torch.tensor([[True, False, True, True, False]] * 2), fields)
    assert mask.device.type == "meta" and mask.shape == (2, 5, 1, 1)
    assert point_mask(torch.tensor([True, False]), fields).shape == (2, 1, 1, 1)


class _PartedComm:
    """Two ranks as seen from rank 0, the other's window having started elsewhere: its
    Allgather part is this rank's with the start row changed."""

    rank, size = 0, 2

    def allgather(self, x):
        other = x.clone()
        other[-1].view(-1)[0] += 1
        return torch.stack([x, other])


def test_a_rank_whose_replicated_window_ended_alone_stops_with_the_reason():
    """The last round's acceptance parted the ranks: this one ended its path (every window
    start past the last step), the other did not. The Allgather of no points that closes the
    path finds their window starts apart, and raises rather than leave the other rank
    waiting in its next round's collective."""
    from pipeline.samplers.ring import evaluate_shared

    states = torch.zeros(1, 4, 3, 3)
    calls = []
    with pytest.raises(RuntimeError, match="disagree on where it starts"):
        evaluate_shared(lambda x, u: calls.append(x) or x, states, np.array([10]), 4, 10,
                        np.linspace(0, 1, 20), _PartedComm())
    assert calls == []  # no points: no model call


def test_ranks_of_a_replicated_window_that_part_ways_stop_with_the_reason():
    from pipeline.samplers.ring import evaluate_shared

    from pipeline.errors import PiadmError

    states = torch.zeros(1, 4, 3, 3)
    with pytest.raises(PiadmError, match="disagree on where it starts") as raised:
        evaluate_shared(lambda x, u: x, states, np.array([0]), 4, 10, np.linspace(0, 1, 20),
                        _PartedComm())
    # a user's fix, told in one line; raised by one group's ranks only, so not collective: the
    # other groups' ranks would wait for them, and the command line aborts the job instead
    assert not raised.value.collective


def test_a_learned_theta_at_zero_tolerance_is_the_sequential_sampler():
    model, grid, noise, y0 = _setup(steps=100)
    opts = Options(window=16, tol=0.0, theta="secant", data_bound=model.data_bound)
    y, stats = SAMPLERS["pc-window"](model, y0, grid, noise, comm=SerialComm(), options=opts)
    y_ref, _ = SAMPLERS["sequential-sde"](model, y0, grid, noise, comm=SerialComm())
    assert _rel(y, y_ref) <= 1e-12 and stats.rounds <= grid.steps


def test_secants_of_a_gaussian_field_learn_its_spectrum_and_its_exact_step():
    """Two evaluations of a point give, per Fourier mode, the Gaussian's own score slope:
    the learned variances are the field's spectrum, and theta its step's Jacobian."""
    model = GaussianRandomField((12, 10))
    grid = make_grid("ou", 50, u_min=1e-3, u_max=10.0, block_size=50)
    t = tables(grid, step_coefficients(grid.u, stochastic=True), model.data_bound, 8, "secant")
    gen = torch.Generator().manual_seed(0)
    y, y2 = torch.randn(2, 1, 8, 12, 10, generator=gen, dtype=torch.float64)
    pos = np.arange(8)[None] + 16  # slot s holds position 16 + s: the window starts at slot 0
    u = torch.from_numpy(t.u[pos[0]])
    sec = secant.begin(y)
    sec.y, sec.g, sec.pos = y2.clone(), model(y2[0], u)[None], pos.copy()
    every = np.ones((1, 8), bool)
    secant.learn(sec, y, model(y[0], u)[None], pos, every, t, model.data_bound)
    secant.absorb(sec, sec.pending)  # the round's Allreduce, on one rank
    assert torch.allclose((sec.num / sec.den)[0], model.spectrum, rtol=1e-8)
    # theta is then the Gaussian's exact slope: the residual slopes measured (the next round)
    # at every point evaluated twice are 0, so the certificate takes the floor of L
    ell = secant.learn(sec, y, model(y[0], u)[None], pos, every, t, model.data_bound)
    assert ell.shape == (1, 8) and np.allclose(ell, 0, atol=1e-12)
    got = secant.certificate(sec, ell, pos, t)
    assert np.allclose(got, secant.FLOOR * t.lipschitz[pos])
    # theta is the step's Jacobian per mode: one sweep from the exact state is the path
    start = torch.randn(1, 12, 10, generator=gen, dtype=torch.float64)
    path = [start[0]]
    st = step_coefficients(grid.u, stochastic=True)
    for k in range(16, 23):
        score = model(path[-1][None], grid.u[k:k + 1])[0]
        path.append(st.decay[k] * path[-1] + st.drift[k] * score)
    guess = torch.randn(1, 8, 12, 10, generator=gen, dtype=torch.float64)
    guess[:, 0] = start
    rebuilt, _, _ = secant_rebuild.rebuild(sec, guess, model(guess[0], u)[None],
                                   torch.zeros_like(guess), np.array([16]), np.array([8]), pos,
                                   every, t, model.data_bound, [(0, 8)], SerialComm())
    assert torch.allclose(rebuilt[0, 1:], torch.stack(path[1:]), atol=1e-10)


def test_a_points_correction_along_its_last_change_makes_its_step_exact_there():
    """Where Theta is not the step's Jacobian (a Gaussian whose covariance has a direction
    that is no Fourier mode), the rebuild still takes a point's step exactly along the change
    it made last round: a point whose new change lies along its last one lands on the path."""
    shape, d = (12, 10), 120
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(d, generator=gen, dtype=torch.float64)
    cov = 0.5 * torch.eye(d, dtype=torch.float64) + 4 * torch.outer(v, v) / d

    def model(x, u):  # the exact score of N(0, cov) at clocks u: -(e^{-u} cov + v0)^-1 x
        eye = torch.eye(d, dtype=torch.float64)
        m = torch.exp(-u)[:, None, None] * cov - torch.expm1(-u)[:, None, None] * eye
        return -torch.linalg.solve(m, x.reshape(len(x), d, 1)).reshape(x.shape)

    bound = float(torch.linalg.eigvalsh(cov).max())
    grid = make_grid("ou", 50, u_min=1e-3, u_max=10.0, block_size=50)
    st = step_coefficients(grid.u, stochastic=True)
    t = tables(grid, st, bound, 8, "secant")
    pos = np.arange(8)[None] + 16
    u = torch.from_numpy(t.u[pos[0]])
    states = torch.randn(1, 8, *shape, generator=gen, dtype=torch.float64)
    step = lambda k, x: st.decay[k] * x + st.drift[k] * model(x[None], grid.u[k:k + 1])[0]  # noqa: E731
    exact_1 = step(16, states[0, 0])  # slot 0 holds Y_b: slot 1's new state is exact
    sec = secant.begin(states)
    sec.pos = pos.copy()
    sec.y = states - 0.3 * (exact_1 - states[0, 1])  # only slot 1's last change matters
    sec.g = model(sec.y[0], u)[None]
    every = np.ones((1, 8), bool)
    secant.learn(sec, states, model(states[0], u)[None], pos, every, t, bound)
    rebuilt, _, _ = secant_rebuild.rebuild(sec, states, model(states[0], u)[None],
                                   torch.zeros_like(states), np.array([16]), np.array([8]), pos,
                                   every, t, bound, [(0, 8)], SerialComm())
    assert torch.allclose(rebuilt[0, 1], exact_1, atol=1e-12)
    # slot 1's change now lies along its last one: its step lands on the path
    assert torch.allclose(rebuilt[0, 2], step(17, exact_1), atol=1e-10)
    # without the correction it would not: Theta is not the Jacobian off the Fourier modes
    theta_only = step(17, states[0, 1]) + torch.fft.irfftn(
        secant.thetas(sec, np.zeros(1, int), t.decay[17:18], t.increment[17:18, 1],
                       t.u[17:18], t.v0[17:18], bound)[0]
        * torch.fft.rfftn(exact_1 - states[0, 1], norm="ortho"), s=shape, norm="ortho")
    assert (theta_only - step(17, exact_1)).norm() > 1e-3 * step(17, exact_1).norm()


def test_a_mode_once_learned_keeps_its_variance_when_others_outweigh_it():
    """As the noise falls, the best-informed mode's weight grows by orders of magnitude; the
    modes learned before stay learned (they fell back to S halfway along the path)."""
    model = GaussianRandomField((12, 10))
    grid = make_grid("ou", 50, u_min=1e-3, u_max=10.0, block_size=50)
    t = tables(grid, step_coefficients(grid.u, stochastic=True), model.data_bound, 8, "secant")
    gen = torch.Generator().manual_seed(0)
    y, y2 = torch.randn(2, 1, 8, 12, 10, generator=gen, dtype=torch.float64)
    pos = np.arange(8)[None] + 16
    u = torch.from_numpy(t.u[pos[0]])
    sec = secant.begin(y)
    sec.y, sec.g, sec.pos = y2.clone(), model(y2[0], u)[None], pos.copy()
    every = np.ones((1, 8), bool)
    secant.learn(sec, y, model(y[0], u)[None], pos, every, t, model.data_bound)
    secant.absorb(sec, sec.pending)
    assert bool(sec.known.all())
    sec.num[0, 0, 1] *= 1e12  # one mode now outweighs the rest by far more than 1 / INFORMED
    sec.den[0, 0, 1] *= 1e12
    secant.learn(sec, y, model(y[0], u)[None], pos, ~every, t, model.data_bound)
    secant.absorb(sec, sec.pending)  # no secants: only the informed modes are taken again
    k = pos[0]
    theta = secant.thetas(sec, np.zeros(8, int), t.decay[k], t.increment[k, 1], t.u[k],
                           t.v0[k], model.data_bound)
    lam = model.spectrum[None]
    exact = (torch.from_numpy(t.decay[k])[:, None, None] - torch.from_numpy(t.increment[k, 1])[
        :, None, None] / (torch.exp(-u)[:, None, None] * lam + torch.from_numpy(t.v0[k])[
            :, None, None]))
    assert torch.allclose(theta, exact, rtol=1e-7)


def test_the_learned_certificate_answers_for_the_error_at_the_paths_end():
    """An error accepted early in a large-variance direction grows by the path's end (on
    grf up to e^{u/2}); certified against the step's noise alone, a point's error took the
    tolerance's scale at the end 5 times over (distance 2.0e-3 and 6.1e-3 here, against
    3.8e-4 and 1.1e-3)."""
    model, grid, noise, y0 = _setup(shape=(24, 24), steps=300, members=2)
    y_ref, _ = SAMPLERS["sequential-sde"](model, y0, grid, noise, comm=SerialComm())
    for tol, within in ((1e-2, 5e-4), (3e-2, 1.5e-3)):
        opts = Options(tol=tol, theta="secant", data_bound=model.data_bound)
        y, _ = SAMPLERS["pc-window"](model, y0, grid, noise, comm=SerialComm(), options=opts)
        worst = ((y - y_ref).flatten(1).norm(dim=1) / y_ref.flatten(1).norm(dim=1)).max()
        assert float(worst) <= within, (tol, float(worst))
    t = tables(grid, step_coefficients(grid.u, stochastic=True), model.data_bound, 65, "secant")
    st = step_coefficients(grid.u, stochastic=True)
    u = grid.u[:-1]
    top = torch.maximum((st.decay - st.drift / (torch.exp(-u) * model.data_bound
                                                 - torch.expm1(-u))).abs(),
                        (st.decay - st.drift / -torch.expm1(-u)).abs())
    for k in (0, 100, 299):  # the top direction's growth from position k on, at least 1
        assert np.isclose(t.to_end[k], max(1.0, float(torch.prod(top[k:]))))
    assert t.to_end.max() > 5 and np.all(t.to_end[300:] == 1)  # 6.1 at u = 4.7
    assert tables(grid, st, model.data_bound, 65, "j_max").to_end is None


def _chain_scan(theta, terms, base, head):
    """The one-rank scan in chain order from ``base``: each slot's state before its own term
    (B, p, ...) and the state after the window's last point (B, ...)."""
    batch, p = theta.shape[:2]
    states, ends = torch.empty_like(terms), []
    for r in range(batch):
        cur = base[r]
        for c in range(p):
            slot = (head[r] + c) % p
            states[r, slot] = cur
            cur = theta[r, slot] * cur + terms[r, slot]
        ends.append(cur)
    return states, torch.stack(ends)


def test_the_learned_rebuild_chains_every_ranks_runs_as_one_rank_scans_them():
    """Split over ranks, a window is runs of slots; their affine maps chained in the window's
    order give each slot the one-rank scan's state (here on simulated ranks)."""
    gen = torch.Generator().manual_seed(1)
    p, batch = 7, 2
    theta = torch.rand(batch, p, 3, 2, generator=gen, dtype=torch.float64) + 0.5
    terms = torch.randn(batch, p, 3, 2, generator=gen, dtype=torch.complex128)
    base = torch.randn(batch, 3, 2, generator=gen, dtype=torch.complex128)
    start = np.array([3, 12])
    head = start % p
    want, want_end = _chain_scan(theta, terms, base, head)
    bounds = [slice_bounds(p, 3, r) for r in range(3)]
    maps_a, maps_c, own = [], [], []
    for lo, hi in bounds:
        high = np.arange(lo, hi)[None] >= head[:, None]
        zero_input = terms[:, lo:hi].clone()
        a, c, before = secant_rebuild._local_scan(theta[:, lo:hi], zero_input, high)
        maps_a.append(a)
        maps_c.append(c)
        own.append((high, zero_input, before))
    first = run_starts(bounds, start, p).reshape(batch, -1)
    inputs, end = secant_rebuild._chain(first, torch.stack(maps_a, 1).flatten(1, 2),
                                torch.stack(maps_c, 1).flatten(1, 2), base, p)
    assert torch.allclose(end, want_end)
    for rank, (lo, hi) in enumerate(bounds):
        high, zero_input, before = own[rank]
        for r in range(batch):
            for j in range(hi - lo):  # a slot's state: its run's input through the Thetas
                x = inputs[r, 2 * rank + (0 if high[r, j] else 1)]
                assert torch.allclose(zero_input[r, j] + before[r, j] * x, want[r, lo + j])



def test_a_ranks_two_runs_scan_as_one_pass_with_the_plain_loops_numbers():
    """A rank's slots are its low run then its high run: one pass that restarts at the high
    run's first slot gives each slot's entering state, each run's end (an empty run's input)
    and the products after each slot, equal bit for bit to a loop over each run alone."""
    gen = torch.Generator().manual_seed(2)
    m = 4
    low = np.arange(m + 1)  # every split, empty low and empty high runs included
    batch = len(low)
    theta = torch.rand(batch, m, 3, 2, generator=gen, dtype=torch.float32) + 0.5
    terms = torch.randn(batch, m, 3, 2, generator=gen, dtype=torch.complex64)
    inputs = torch.randn(batch, 2, 3, 2, generator=gen, dtype=torch.complex64)
    along = torch.randn(batch, m, 3, 2, generator=gen, dtype=torch.complex64)
    states, ends = secant_rebuild._scan_runs(theta, terms, low, inputs)
    high = np.arange(m)[None] >= low[:, None]
    carried = secant_rebuild._carried(theta, along, high)
    for r in range(batch):
        for run, slots in ((1, range(low[r])), (0, range(low[r], m))):
            x = inputs[r, run]
            for j in slots:
                assert torch.equal(states[r, j], x)
                x = theta[r, j] * x + terms[r, j]
            assert torch.equal(ends[r, run], x)
            after = torch.ones_like(theta[r, 0])
            for j in reversed(slots):
                assert torch.equal(carried[r, j], after * along[r, j])
                after = theta[r, j] * after

class _ThreadComm:
    """Rank ``rank`` of ranks simulated by threads: a real Allgather between them, each call
    recorded with the shape it sent."""

    def __init__(self, rank, size, shared):
        self.rank, self.size, self.shared, self.sent = rank, size, shared, []

    def allgather(self, part):
        self.sent.append(tuple(part.shape))
        slots, barrier = self.shared
        slots[self.rank] = part.clone()
        barrier.wait()
        out = torch.stack(slots)
        barrier.wait()
        return out


def test_split_slots_rebuild_both_scans_in_one_allgather_as_one_rank_does():
    """Across ranks the learned rebuild's one Allgather carries each rank's run maps (5
    half-fields a row), its runs' sums of the corrections' known parts (2) and 2 half-fields
    a slot for the rest; the slots' Yhat, corrections included, and the window's end are the
    one-rank scans': the first from Y_b, each point's reach <a, Yhat> + b against its Yhat,
    the second from zero through the same Thetas."""
    import threading

    gen = torch.Generator().manual_seed(2)
    p, batch, half, ranks = 8, 2, (3, 2), 3
    theta = torch.rand(batch, p, *half, generator=gen, dtype=torch.float64) + 0.5
    cplx = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.complex128)  # noqa: E731
    terms, along, on = cplx(batch, p, *half), cplx(batch, p, *half), cplx(batch, p, *half)
    at = torch.randn(batch, p, generator=gen, dtype=torch.float64)
    along[0, 3] = on[0, 3] = at[0, 3] = 0  # a point evaluated once: no correction
    base, x0 = cplx(batch, *half), cplx(batch, *half)
    start = np.array([1, 5])
    head = start % p
    first, end1 = _chain_scan(theta, terms, base, head)
    reach = (on.conj() * first).real.flatten(2).sum(-1) + at
    shift, end2 = _chain_scan(theta, along * reach[..., None, None], torch.zeros_like(base),
                              head)
    bounds = [slice_bounds(p, ranks, r) for r in range(ranks)]
    shared = ([None] * ranks, threading.Barrier(ranks, timeout=60))
    comms = [_ThreadComm(r, ranks, shared) for r in range(ranks)]
    got = [None] * ranks

    def rank_part(r):
        lo, hi = bounds[r]
        high = np.arange(lo, hi)[None] >= head[:, None]
        mine, corr = terms[:, lo:hi].clone(), along[:, lo:hi].clone()
        held = (head >= lo) & (head < hi)  # Y_b and x0 from the ranks that hold them
        own_base = torch.where(torch.from_numpy(held)[:, None, None], base, 0)
        end, x0hat = secant_rebuild._split_ring(theta[:, lo:hi], mine, corr,
                                        (on[:, lo:hi], at[:, lo:hi]), own_base,
                                        x0 if r == 0 else torch.zeros_like(x0), high, start,
                                        bounds, comms[r])
        got[r] = (mine, end, x0hat)

    threads = [threading.Thread(target=rank_part, args=(r,)) for r in range(ranks)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    most = max(hi - lo for lo, hi in bounds)
    for r, (lo, hi) in enumerate(bounds):
        mine, end, x0hat = got[r]
        assert comms[r].sent == [(batch, 7 + 2 * most, *half, 2)]  # one Allgather a round
        assert torch.allclose(mine, (first + shift)[:, lo:hi])
        assert torch.allclose(end, end1 + end2) and torch.allclose(x0hat, x0)


def test_a_learned_theta_takes_fewer_rounds_and_calls_on_a_gaussian_field():
    model, grid, noise, y0 = _setup(shape=(16, 16), steps=400, members=2)
    y_ref, _ = SAMPLERS["sequential-sde"](model, y0, grid, noise, comm=SerialComm())
    runs = {theta: SAMPLERS["pc-window"](model, y0, grid, noise, comm=SerialComm(),
                                         options=Options(tol=1e-3, theta=theta,
                                                         data_bound=model.data_bound))
            for theta in ("j_max", "secant")}
    (_, s_j), (y_s, s_s) = runs["j_max"], runs["secant"]
    assert s_s.rounds <= 0.85 * s_j.rounds and s_s.model_calls <= 0.85 * s_j.model_calls
    assert _rel(y_s, y_ref) <= 1e-3


def test_a_learned_theta_keeps_a_members_result_independent_of_its_batch():
    """A batched FFT rounds a 3-D field's rows differently with the batch's size: each row
    is transformed by a call of its own."""
    model, grid, noise, y0 = _setup(shape=(6, 10, 8), steps=80, members=3)
    opts = Options(window=9, tol=3e-3, theta="secant", data_bound=model.data_bound)
    y, _ = SAMPLERS["pc-window"](model, y0, grid, noise, comm=SerialComm(), options=opts)
    one = noise.subset([2])
    y_one, _ = SAMPLERS["pc-window"](model, one.prior(), grid, one, comm=SerialComm(),
                                     options=opts)
    assert torch.equal(y_one[0], y[2])

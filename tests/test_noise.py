"""Counter-based keyed noise (docs/algorithms.md section 3): noise is an argument, never hidden state."""
import math

import numpy as np
import pytest
import torch

from pipeline.noise import (CORRECTOR_PATH, CORRECTOR_V0, PATH, SOURCES, Noise, member_seed,
                            standard_normal)

F64 = torch.float64
SHAPE = (3, 4)
KEYS = ((0, 0), (0, 1), (0, 2))


def noise(keys=KEYS, seed=11, shape=SHAPE, dtype=F64, source="host"):
    return Noise(seed, keys, shape, dtype=dtype, source=source)


@pytest.mark.parametrize("source", SOURCES)
def test_prior_is_independent_of_batch_composition(source):
    full = noise(source=source).prior()
    alone = noise(source=source, keys=((0, 1),)).prior()
    torch.testing.assert_close(full[1:2], alone, rtol=0, atol=0)
    torch.testing.assert_close(noise(source=source).subset([1]).prior(), alone, rtol=0, atol=0)
    reordered = noise(source=source, keys=((0, 2), (5, 5), (0, 0))).prior()
    torch.testing.assert_close(reordered[[2, 0]], full[[0, 2]], rtol=0, atol=0)


@pytest.mark.parametrize("source", SOURCES)
def test_path_is_independent_of_batch_composition(source):
    full = noise(source=source).path(3, 9)
    alone = noise(source=source, keys=((0, 1),)).path(3, 9)
    torch.testing.assert_close(full[1:2], alone, rtol=0, atol=0)
    torch.testing.assert_close(noise(source=source).subset([1]).path(3, 9), alone, rtol=0, atol=0)
    torch.testing.assert_close(noise(source=source).path(3, 9, rows=[2, 1]), full[[2, 1]], rtol=0, atol=0)


@pytest.mark.parametrize("source", SOURCES)
def test_corrector_is_independent_of_batch_composition(source):
    v0, dw = noise(source=source).corrector(2, 0, 5)
    v0_alone, dw_alone = noise(source=source).subset([2]).corrector(2, 0, 5)
    torch.testing.assert_close(v0[2:], v0_alone, rtol=0, atol=0)
    torch.testing.assert_close(dw[2:], dw_alone, rtol=0, atol=0)


@pytest.mark.parametrize("lo,mid,hi", [(0, 1, 2), (0, 4, 10), (5, 5, 9), (7, 12, 12)])
@pytest.mark.parametrize("source", SOURCES)
def test_path_splits_at_any_point(lo, mid, hi, source):
    n = noise(source=source)
    whole = n.path(lo, hi)
    torch.testing.assert_close(torch.cat([n.path(lo, mid), n.path(mid, hi)], 1), whole,
                               rtol=0, atol=0)


@pytest.mark.parametrize("source", SOURCES)
def test_corrector_path_splits_at_any_point(source):
    n = noise(source=source)
    _, whole = n.corrector(1, 0, 9)
    _, left = n.corrector(1, 0, 4)
    _, right = n.corrector(1, 4, 9)
    torch.testing.assert_close(torch.cat([left, right], 1), whole, rtol=0, atol=0)


@pytest.mark.parametrize("source", SOURCES)
def test_path_step_j_is_the_same_draw_in_any_window(source):
    n = noise(source=source)
    torch.testing.assert_close(n.path(0, 10)[:, 6], n.path(6, 7)[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(n.path(0, 10)[:, 6], n.path(4, 8)[:, 2], rtol=0, atol=0)


def test_draws_are_reproducible():
    torch.testing.assert_close(noise().path(0, 3), noise().path(0, 3), rtol=0, atol=0)


def distinct(*draws):
    flat = [d.flatten() for d in draws]
    return all(not torch.equal(flat[i], flat[j])
               for i in range(len(flat)) for j in range(i + 1, len(flat)))


def test_different_keys_give_different_draws():
    n = noise(keys=((0, 0), (0, 1), (1, 0), (1, 1)))
    rows = n.path(0, 1)[:, 0]
    assert distinct(*rows)  # items and members, and (0, 1) vs (1, 0)
    assert distinct(noise(seed=1).prior(), noise(seed=2).prior())
    steps = noise().path(0, 5)
    assert distinct(*steps.unbind(1))


def test_streams_give_different_draws_at_the_same_index():
    n = noise()
    prior = n.prior()
    step0 = n.path(0, 1)[:, 0]
    v0, dw = n.corrector(0, 0, 1)
    assert distinct(prior, step0, v0, dw[:, 0])


def test_corrector_blocks_give_different_draws():
    n = noise()
    v0_a, dw_a = n.corrector(0, 0, 3)
    v0_b, dw_b = n.corrector(1, 0, 3)
    assert distinct(v0_a, v0_b)
    assert distinct(dw_a, dw_b)
    assert distinct(*dw_a.unbind(1))


def test_draws_are_standard_normal():
    n = 200_000
    x = torch.from_numpy(standard_normal(5, 1, 0, (n,)))
    se = 1 / math.sqrt(n)
    assert abs(float(x.mean())) < 5 * se
    assert abs(float(x.var()) - 1) < 5 * math.sqrt(2) * se
    assert abs(float((x**4).mean()) - 3) < 5 * math.sqrt(96) * se  # E z^8 - (E z^4)^2 = 96
    assert abs(float((x.abs() < 1).double().mean()) - 0.682689492137) < 5 * 0.5 * se


def test_noise_draws_are_standard_normal_and_uncorrelated_across_keys():
    draws = Noise(3, ((0, 0), (0, 1)), (100, 100), dtype=F64).path(0, 10)
    x = draws.reshape(2, -1)
    n = x.shape[1]
    se = 1 / math.sqrt(n)
    assert float(x.mean(1).abs().max()) < 5 * se
    assert float((x.var(1) - 1).abs().max()) < 5 * math.sqrt(2) * se
    assert abs(float((x[0] * x[1]).mean())) < 5 * se
    # Consecutive steps of one trajectory are uncorrelated too.
    assert abs(float((draws[0, :-1] * draws[0, 1:]).mean())) < 5 / math.sqrt(9 * 100 * 100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_shapes(dtype):
    n = noise(dtype=dtype)
    assert n.prior().shape == (3, *SHAPE) and n.prior().dtype == dtype
    assert n.path(2, 7).shape == (3, 5, *SHAPE) and n.path(2, 7).dtype == dtype
    assert n.path(2, 7, rows=[0]).shape == (1, 5, *SHAPE)
    v0, dw = n.corrector(1, 3, 7)
    assert v0.shape == (3, *SHAPE) and dw.shape == (3, 4, *SHAPE)
    assert v0.dtype == dtype and dw.dtype == dtype
    assert n.path(4, 4).shape == (3, 0, *SHAPE)


def test_default_dtype_is_float32_and_matches_float64_draws():
    low = Noise(11, KEYS, SHAPE).path(0, 2)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, noise().path(0, 2).float(), rtol=0, atol=0)



@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_threaded_draws_equal_the_draws_made_one_at_a_time(dtype):
    # 2 x 3 fields of 256 x 256 pass the threading threshold; single draws never use threads
    n = Noise(5, ((0, 0), (1, 3)), (256, 256), dtype=dtype)
    together = n.path(7, 10)
    alone = torch.stack([torch.cat([n.subset([b]).path(j, j + 1) for j in range(7, 10)], 1)[0]
                         for b in range(2)])
    assert torch.equal(together, alone)
    ref = standard_normal(member_seed(5, 1, 3), PATH, 9, (256, 256))  # row 1, step 9
    assert torch.equal(together[1, 2], torch.from_numpy(ref).to(dtype))


def test_the_keys_hashed_at_once_are_numpys_seedsequence_for_every_length():
    """``seed_hash`` redoes SeedSequence on arrays: any word it got wrong would change every
    member of every store."""
    from pipeline.seed_hash import philox_keys, words

    rng = np.random.default_rng(0)
    keys = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1,
            *(int(k) for k in rng.integers(0, 2**63, 50))]
    for spawn in [(0, 0), (1, 9), (3, 2, 7), (2, 2**32), (1, 2**40 + 5), (0,), (1, 2, 3, 4, 5)]:
        mine = philox_keys(np.array(keys, dtype=np.uint64),
                           np.tile(np.array(words(spawn), dtype=np.uint32), (len(keys), 1)))
        for key, got in zip(keys, mine):
            want = np.random.SeedSequence(key, spawn_key=spawn).generate_state(2, np.uint64)
            assert np.array_equal(got, want), (key, spawn)


@pytest.mark.parametrize("members,steps", [(1, 3), (40, 1), (8, 6), (3, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_draws_are_the_definitions_whether_hashed_one_by_one_or_at_once(members, steps, dtype):
    # under 32 draws a call SeedSequence hashes each; from 32 seed_hash hashes them together
    keys = tuple((2, m) for m in range(members))
    n = Noise(7, keys, (5, 6), dtype=dtype)
    path, (v0, dw) = n.path(10, 10 + steps), n.corrector(4, 0, steps)
    for b, key in enumerate(keys):
        seed = member_seed(7, *key)
        for j in range(steps):
            want = torch.from_numpy(standard_normal(seed, PATH, 10 + j, (5, 6))).to(dtype)
            assert torch.equal(path[b, j], want)
            want = standard_normal(seed, CORRECTOR_PATH, (4, j), (5, 6))
            assert torch.equal(dw[b, j], torch.from_numpy(want).to(dtype))
        want = standard_normal(seed, CORRECTOR_V0, 4, (5, 6))
        assert torch.equal(v0[b], torch.from_numpy(np.asarray(want)).to(dtype))


@pytest.mark.parametrize("source", SOURCES)
def test_scattered_points_drawn_at_once_are_each_points_own_draw(source):
    # a window's new points: another step for each row, several for some, none for others
    n = noise(source=source, keys=tuple((0, m) for m in range(6)))
    rows, steps = [0, 0, 3, 5, 5, 5, 2], [4, 9, 0, 7, 8, 30, 4]
    together = n.path_at(rows, steps)
    for k, (r, j) in enumerate(zip(rows, steps)):
        assert torch.equal(together[k], n.path(j, j + 1, [r])[0, 0])
    assert n.path_at([], []).shape == (0, *SHAPE)
    many = Noise(5, tuple((0, m) for m in range(8)), SHAPE, F64)  # 40 points: hashed at once
    rows = [r for r in range(8) for _ in range(5)]
    steps = [3 * r + k for r in range(8) for k in range(5)]
    for k, point in enumerate(many.path_at(rows, steps)):
        want = standard_normal(member_seed(5, 0, rows[k]), PATH, steps[k], SHAPE)
        assert torch.equal(point, torch.from_numpy(want))


def test_a_negative_index_is_refused_as_numpy_refuses_it():
    # shifting a negative int right never reaches 0: the word split looped until memory ran out
    for rows in (1, 40):
        with pytest.raises(ValueError, match="non-negative"):
            Noise(0, tuple((0, m) for m in range(rows)), (2, 2)).path(-1, 0)


def test_draws_shared_among_threads_are_the_definitions(monkeypatch):
    from pipeline import noise as noise_module

    monkeypatch.setattr(noise_module, "_workers", lambda: 3)
    n = Noise(5, tuple((0, m) for m in range(8)), (64, 64))  # 8 x 9 fields pass the threshold
    draws = n.path(0, 9)
    for b in (0, 5):
        for j in (0, 4, 8):
            want = standard_normal(member_seed(5, 0, b), PATH, j, (64, 64))
            assert torch.equal(draws[b, j], torch.from_numpy(want).float())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_device_draws_are_standard_normal_keyed_and_not_the_host_draws(dtype):
    n = Noise(3, ((0, 0), (0, 1)), (100, 100), dtype=dtype, source="device")
    draws = n.path(0, 10)
    assert draws.dtype == dtype and torch.equal(draws, n.path(0, 10))
    x = draws.reshape(2, -1).double()
    se = 1 / math.sqrt(x.shape[1])
    assert float(x.mean(1).abs().max()) < 5 * se
    assert float((x.var(1) - 1).abs().max()) < 5 * math.sqrt(2) * se
    assert abs(float((x[0] * x[1]).mean())) < 5 * se
    assert abs(float((draws[0, :-1] * draws[0, 1:]).double().mean())) < 5 / math.sqrt(9 * 100 * 100)
    host = Noise(3, ((0, 0), (0, 1)), (100, 100), dtype=dtype).path(0, 10)
    assert not torch.equal(draws, host)


def test_an_unknown_noise_source_is_refused():
    with pytest.raises(ValueError, match="noise source 'gpu'"):
        Noise(0, KEYS, SHAPE, source="gpu")


def test_large_draws_share_out_over_each_runs_own_thread_count(monkeypatch):
    """A process may run one run after another with other parallel.threads (the API in a
    notebook): each run's draws use its own width, not the first run's."""
    from pipeline import noise as noise_module

    widths, pool = [], noise_module._pool
    monkeypatch.setattr(noise_module, "_pool", lambda w: widths.append(w) or pool(w))
    before = torch.get_num_threads()
    try:
        for threads in (2, 3, 2):
            torch.set_num_threads(threads)
            Noise(5, tuple((0, m) for m in range(8)), (64, 64)).path(0, 9)
    finally:
        torch.set_num_threads(before)
    assert widths == [2, 3, 2]

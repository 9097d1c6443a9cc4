"""Who owns which points: pure block distribution, no MPI."""
import pytest

from pipeline.decomposition import group_of, owner_of, share, slice_bounds

CASES = [(n, parts) for n in list(range(0, 26)) + [99, 100, 101, 1000] for parts in range(1, 12)]


def check_partition(n, parts):
    bounds = [slice_bounds(n, parts, i) for i in range(parts)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(parts - 1))
    sizes = [hi - lo for lo, hi in bounds]
    assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1
    assert sum(sizes) == n
    # The larger slices come first: sizes are non-increasing.
    assert sizes == sorted(sizes, reverse=True)
    assert sizes.count(n // parts + 1) == n % parts


def test_slices_partition_range_with_sizes_differing_by_at_most_one():
    for n, parts in CASES:
        check_partition(n, parts)


def test_owner_of_agrees_with_slice_bounds():
    for n, parts in CASES:
        for point in range(n):
            owner = owner_of(n, parts, point)
            lo, hi = slice_bounds(n, parts, owner)
            assert lo <= point < hi, (n, parts, point, owner)


def test_fewer_points_than_parts_gives_one_point_then_empty_slices():
    assert [slice_bounds(3, 5, i) for i in range(5)] == [(0, 1), (1, 2), (2, 3), (3, 3), (3, 3)]
    assert [owner_of(3, 5, p) for p in range(3)] == [0, 1, 2]


@pytest.mark.parametrize("parts,index", [(0, 0), (-1, 0), (3, 3), (3, -1), (1, 1)])
def test_bad_slice_request_raises(parts, index):
    with pytest.raises(ValueError):
        slice_bounds(10, parts, index)


@pytest.mark.parametrize("n,point", [(10, -1), (10, 10), (0, 0), (5, 17)])
def test_owner_of_point_outside_range_raises(n, point):
    with pytest.raises(ValueError):
        owner_of(n, 3, point)


@pytest.mark.parametrize("parts", [0, -1])
def test_owner_of_rejects_non_positive_parts(parts):
    with pytest.raises(ValueError):
        owner_of(10, parts, 3)


def test_slice_bounds_rejects_negative_n():
    with pytest.raises(ValueError):
        slice_bounds(-3, 2, 0)


def test_shares_cover_the_items_once_in_order():
    items = list(range(7))
    parts = [share(items, 3, k) for k in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]


def test_consecutive_ranks_form_a_group():
    assert [group_of(r, 2) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with pytest.raises(ValueError):
        group_of(0, 0)

"""Who owns what: pure functions; the decomposition maths has no MPI in it."""
from __future__ import annotations


def slice_bounds(n: int, parts: int, index: int) -> tuple[int, int]:
    """Half-open range [lo, hi) of part ``index`` when n points are cut into ``parts`` contiguous
    slices whose sizes differ by at most one (the first ``n % parts`` slices get one more)."""
    if n < 0 or parts < 1 or not 0 <= index < parts:
        raise ValueError(f"bad slice request: part {index} of {parts} over {n} points")
    size, extra = divmod(n, parts)
    lo = index * size + min(index, extra)
    return lo, lo + size + (1 if index < extra else 0)


def owner_of(n: int, parts: int, point: int) -> int:
    """Index of the part whose slice (as in ``slice_bounds``) holds ``point`` of n."""
    if parts < 1 or not 0 <= point < n:
        raise ValueError(f"bad owner request: point {point} of {n} over {parts} parts")
    size, extra = divmod(n, parts)
    cut = extra * (size + 1)
    return point // (size + 1) if point < cut else extra + (point - cut) // size


def share(items: list, parts: int, index: int) -> list:
    """The contiguous share of ``items`` that part ``index`` of ``parts`` owns."""
    lo, hi = slice_bounds(len(items), parts, index)
    return items[lo:hi]


def group_of(rank: int, time_slices: int) -> tuple[int, int]:
    """(group, slice) of a world rank when consecutive ranks form the time slices of a group."""
    if time_slices < 1 or rank < 0:
        raise ValueError(f"bad rank grid request: rank {rank} with {time_slices} time slices")
    return divmod(rank, time_slices)

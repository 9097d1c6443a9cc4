"""Who owns what: pure functions, no MPI (STYLE.md, 'decomposition maths has no MPI in it')."""
from __future__ import annotations


def slice_bounds(n: int, parts: int, index: int) -> tuple[int, int]:
    """Half-open range [lo, hi) of part ``index`` when n points are cut into ``parts`` contiguous
    slices whose sizes differ by at most one (the first ``n % parts`` slices get one more)."""
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"bad slice request: part {index} of {parts}")
    size, extra = divmod(n, parts)
    lo = index * size + min(index, extra)
    return lo, lo + size + (1 if index < extra else 0)


def owner_of(n: int, parts: int, point: int) -> int:
    """Index of the part whose slice (as in ``slice_bounds``) holds ``point`` of n."""
    if not 0 <= point < n:
        raise ValueError(f"point {point} outside 0..{n - 1}")
    size, extra = divmod(n, parts)
    cut = extra * (size + 1)
    return point // (size + 1) if point < cut else extra + (point - cut) // size

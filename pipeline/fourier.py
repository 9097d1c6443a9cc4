"""The real FFT's half-grid, shared by the exact Gaussian model, its quality measures and the
learned corrector: a leaf module (torch only), so that ``models`` may import it."""
from __future__ import annotations

import torch


def half_weights(shape: tuple[int, ...]) -> torch.Tensor:
    """How many modes of the full spectrum each rfftn coefficient of a real field of ``shape``
    stands for (1 or 2), float64 of the half-grid's shape: sum(w |x_hat|^2) = sum(x^2) for the
    orthonormal transform."""
    n = shape[-1]
    w = torch.full((n // 2 + 1,), 2.0, dtype=torch.float64)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return w.expand(*shape[:-1], n // 2 + 1)

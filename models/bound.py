"""S, the data-covariance bound that pc-window's certified acceptance needs, from data.

For fields on a periodic grid the covariance is (close to) diagonal in Fourier space, so its
largest eigenvalue is the largest mean power of one Fourier mode of the normalised fields
(orthonormal FFT: a field of unit variance per point has mean mode power 1).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch


def largest_mode_power(chunks: Iterable[np.ndarray], mean: float, std: float) -> float:
    """Largest mean power over fields of one Fourier mode of (x - mean) / std, for ``chunks``
    of fields (T, *S) over the last 1 to 3 dims; float."""
    total, count = None, 0
    for chunk in chunks:
        x = torch.as_tensor((np.asarray(chunk, dtype=np.float64) - mean) / std)
        dims = tuple(range(1, x.dim()))
        power = (torch.fft.fftn(x, dim=dims, norm="ortho").abs() ** 2).sum(0)
        total = power if total is None else total + power
        count += x.shape[0]
    if not count:
        raise ValueError("largest_mode_power: no fields given")
    return float(total.max() / count)

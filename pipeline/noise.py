"""Counter-based Gaussian noise keyed by (seed, item, member, stream, index).

Each trajectory has a member seed hashed from (seed, item, member), stored with the ensemble;
every field-sized draw of it is keyed by (member seed, stream, index) and hashed by numpy's
``SeedSequence`` into a Philox key, so a draw depends only on its key: never on batching,
block layout or rank count (ALGORITHM.md section 6). Streams separate the uses of noise in
one trajectory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

PRIOR, PATH, CORRECTOR_V0, CORRECTOR_PATH = 0, 1, 2, 3

# Corrector draws of block n, step r use index n * CORRECTOR_STRIDE + r.
CORRECTOR_STRIDE = 1 << 20


def member_seed(seed: int, item: int, member: int) -> int:
    """The 63-bit seed of trajectory (item, member) of a run with base ``seed``."""
    state = np.random.SeedSequence(seed, spawn_key=(item, member)).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def standard_normal(key: int, stream: int, index: int, shape: Sequence[int]) -> np.ndarray:
    """One float64 N(0, I) draw of ``shape`` for (member seed ``key``, stream, index)."""
    ss = np.random.SeedSequence(key, spawn_key=(stream, index))
    gen = np.random.Generator(np.random.Philox(key=ss.generate_state(2, np.uint64)))
    return gen.standard_normal(tuple(shape))


@dataclass(frozen=True)
class Noise:
    """Noise for one batch of trajectories: ``keys[b] = (item, member)`` of batch row b.

    Every method returns a tensor of ``dtype`` on ``device``.
    """

    seed: int
    keys: tuple[tuple[int, int], ...]
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    device: str | torch.device = "cpu"

    def _draw(self, stream: int, rows: Sequence[int], indices: Sequence[int]) -> torch.Tensor:
        out = np.empty((len(rows), len(indices), *self.shape))
        for i, b in enumerate(rows):
            key = member_seed(self.seed, *self.keys[b])
            for j, idx in enumerate(indices):
                out[i, j] = standard_normal(key, stream, idx, self.shape)
        return torch.from_numpy(out).to(device=self.device, dtype=self.dtype)

    def subset(self, rows: Sequence[int]) -> "Noise":
        """The noise of batch rows ``rows`` only."""
        keys = tuple(self.keys[b] for b in rows)
        return Noise(self.seed, keys, self.shape, self.dtype, self.device)

    def prior(self) -> torch.Tensor:
        """Start states y_0 ~ N(0, I) at u_max, (B, *shape)."""
        return self._draw(PRIOR, range(len(self.keys)), [0])[:, 0]

    def path(self, lo: int, hi: int, rows: Sequence[int] | None = None) -> torch.Tensor:
        """xi_j for global steps j in [lo, hi), (B, hi - lo, *shape)."""
        rows = range(len(self.keys)) if rows is None else rows
        return self._draw(PATH, rows, range(lo, hi))

    def corrector(self, block: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrector start velocity (B, *shape) and Brownian increments (B, hi - lo, *shape)."""
        rows = range(len(self.keys))
        v0 = self._draw(CORRECTOR_V0, rows, [block])[:, 0]
        base = block * CORRECTOR_STRIDE
        return v0, self._draw(CORRECTOR_PATH, rows, range(base + lo, base + hi))

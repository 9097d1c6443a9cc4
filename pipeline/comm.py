"""The communicator interface samplers use, and its serial implementation.

Samplers receive a communicator explicitly (STYLE.md); a one-rank communicator runs the same
code path as many. Tensors passed to the collectives are reduced element-wise and keep their
shape, dtype and device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SerialComm:
    """A one-rank communicator: every collective is the identity (or zero for exscan)."""

    rank: int = 0
    size: int = 1

    def exscan_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Exclusive prefix sum over ranks: sum of x on ranks < this rank (zeros on rank 0)."""
        return torch.zeros_like(x)

    def allreduce_max(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def allreduce_min(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def allreduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def bcast(self, x: torch.Tensor, root: int) -> torch.Tensor:
        return x

    def barrier(self) -> None:
        return None

"""An emulated accelerator, for measuring scale-out on machines without GPUs.

``Emulated(base, latency_ms, per_item_ms)`` answers every call exactly as ``base`` does, but
makes a call of n items last at least latency_ms + n * per_item_ms of wall time by sleeping
through the rest. Sleeping ranks leave the cores to the others, so many ranks fit on a small
machine and rank scaling can be measured as if each had its own device: a GPU's cost curve is
flat in n (launch latency) until the batch fills it, then linear.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Emulated:
    """``base`` (a score model, ``models.contract``) with every call padded to at least
    ``latency_ms + n * per_item_ms`` for a batch of n states."""

    base: object
    latency_ms: float
    per_item_ms: float

    def __getattr__(self, name):  # shape, data_bound, data_mean, ... are the base model's
        return getattr(self.base, name)

    def seconds(self, n: int) -> float:
        """The least wall time of a call of n items, in seconds."""
        return (self.latency_ms + n * self.per_item_ms) / 1000

    def __call__(self, x, u):
        start = time.perf_counter()
        out = self.base(x, u)
        rest = self.seconds(x.shape[0]) - (time.perf_counter() - start)
        if rest > 0:
            time.sleep(rest)
        return out

    def conditioned(self, field) -> "Emulated":
        """The base model bound to a conditioning field, still emulated."""
        return replace(self, base=self.base.conditioned(field))

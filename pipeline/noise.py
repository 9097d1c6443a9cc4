"""Counter-based Gaussian noise keyed by (seed, item, member, stream, index).

Each trajectory has a member seed hashed from (seed, item, member), stored with the ensemble;
every field-sized draw of it is keyed by (member seed, stream, index) and hashed by numpy's
``SeedSequence`` into a Philox key, so a draw depends only on its key: never on batching,
block layout or rank count (docs/algorithms.md section 2). Streams separate the uses of noise in
one trajectory.

Two sources fill the draws. ``host`` (the default): numpy's Philox on the CPU, the same numbers
on every machine and device. ``device``: torch's generator on the sampling device, seeded by
the same key, so draws are still independent of batching and ranks but depend on the device
type (a GPU's model too: a large draw is spread over as many threads as it holds; a CPU's
vector instructions may matter as well), dtype and torch version. On a GPU the host fills
about 1e8 numbers a second with 16 cores, which is the whole time of a 1000-step sampler at
1024x1024; the device source removes it.

``standard_normal`` defines a host draw. ``Noise`` makes the same numbers faster where a call
holds many small draws (hundreds of members of a small field): their keys hashed together
(``pipeline.seed_hash``) and one Philox generator a thread re-keyed for each draw, where
making a SeedSequence and a generator per draw cost about 30 us whatever the draw's size.
"""
from __future__ import annotations

import functools
import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pipeline.choices import SOURCES  # sampler.noise
from pipeline.seed_hash import philox_keys, words

PRIOR, PATH, CORRECTOR_V0, CORRECTOR_PATH = 0, 1, 2, 3

# Draws of at least this many numbers in all are filled by threads: numpy's generators release
# the GIL while they fill, and on a GPU the host's draws are what the sampler waits for.
_THREADED_SIZE = 1 << 18

# Calls of at least this many draws hash their Philox keys in one pass (``seed_hash``): its
# array operations cost about 0.2 ms a call, one SeedSequence about 14 us a draw.
_VECTOR_DRAWS = 32

_LOCAL = threading.local()  # each thread's own Philox, re-keyed for every draw


def _workers() -> int:
    """Threads that fill large draws: this rank's share of the cores (``place_rank``), read
    at each draw: a later run in the same process may set ``parallel.threads`` otherwise."""
    return max(1, torch.get_num_threads())


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool ``workers`` wide: one per width asked (its threads are made as
    draws need them), none shut down under a run of another width in another thread."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="piadm-noise")


Index = int | tuple[int, ...]  # a draw's place in its stream: a step, or (block, step)


def _spawn(stream: int, index: Index) -> tuple[int, ...]:
    return (stream, *index) if isinstance(index, tuple) else (stream, index)


def _hash63(entropy: int, *spawn: int) -> int:
    state = np.random.SeedSequence(entropy, spawn_key=spawn).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def member_seed(seed: int, item: int, member: int) -> int:
    """The 63-bit seed of trajectory (item, member) of a run with base ``seed``."""
    return _hash63(seed, item, member)


def draw_seed(key: int, stream: int, index: Index) -> int:
    """The 63-bit torch generator seed of draw (member seed ``key``, stream, index)."""
    return _hash63(key, *_spawn(stream, index))


def standard_normal(key: int, stream: int, index: Index, shape: Sequence[int]) -> np.ndarray:
    """One float64 N(0, I) draw of ``shape`` for (member seed ``key``, stream, index): the
    definition of the host noise (``Noise`` draws the same numbers faster)."""
    ss = np.random.SeedSequence(key, spawn_key=_spawn(stream, index))
    gen = np.random.Generator(np.random.Philox(key=ss.generate_state(2, np.uint64)))
    return gen.standard_normal(tuple(shape))


def host_fingerprint() -> str:
    """The SHA-256 of one fixed host draw (256 numbers): stores record it, so that a resumed
    store's new members are known to come from the same numbers as its old ones. numpy keeps
    Philox's bits stable across versions but not, by promise, its normal sampler's."""
    draw = standard_normal(member_seed(0, 0, 0), PATH, 0, (256,))
    return hashlib.sha256(draw.astype("<f8").tobytes()).hexdigest()


def _draw_keys(keys: Sequence[int], spawns: Sequence[tuple[int, ...]]) -> np.ndarray:
    """Philox keys (N, 2) of ``standard_normal``'s draws of member seeds ``keys`` with spawn
    keys ``spawns`` ((stream, *index), one each)."""
    spawn_words = [words(spawn) for spawn in spawns] if len(keys) >= _VECTOR_DRAWS else []
    if not spawn_words or len({len(w) for w in spawn_words}) > 1:
        return np.array([np.random.SeedSequence(k, spawn_key=spawn).generate_state(2, np.uint64)
                         for k, spawn in zip(keys, spawns)], dtype=np.uint64).reshape(-1, 2)
    return philox_keys(np.asarray(keys, dtype=np.uint64), np.asarray(spawn_words, dtype=np.uint32))


def _normal(key: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``standard_normal``'s draw of Philox key ``key`` (2,) uint64, on this thread's
    generator: re-keying one costs a fraction of making a new one."""
    if not hasattr(_LOCAL, "bits"):
        _LOCAL.bits = np.random.Philox(0)
        _LOCAL.gen = np.random.Generator(_LOCAL.bits)
    _LOCAL.bits.state = {"bit_generator": "Philox",
                         "state": {"counter": np.zeros(4, np.uint64), "key": key},
                         "buffer": np.zeros(4, np.uint64), "buffer_pos": 4, "has_uint32": 0,
                         "uinteger": 0}
    return _LOCAL.gen.standard_normal(shape)


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
    source: str = "host"

    @classmethod
    def members(cls, seed: int, item: int, members: Sequence[int], shape: Sequence[int],
                *fields, **named) -> "Noise":
        """The noise of members ``members`` of item index ``item`` of a run with ``seed``;
        ``fields`` and ``named``: Noise's own after its shape (dtype, device, source)."""
        return cls(seed, tuple((item, m) for m in members), tuple(shape), *fields, **named)

    def member_seeds(self) -> tuple[int, ...]:
        """The seed of each row's trajectory (stored with the ensemble), (B,)."""
        return self._seeds

    @functools.cached_property
    def _seeds(self) -> tuple[int, ...]:  # hashed once per batch, not once per draw
        return tuple(member_seed(self.seed, *key) for key in self.keys)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"noise source {self.source!r}: use one of {', '.join(SOURCES)}")

    def _draw(self, stream: int, rows: Sequence[int], indices: Sequence[Index]) -> torch.Tensor:
        """Draws (len(rows), len(indices), *shape) of batch rows ``rows`` at ``indices``."""
        pairs = [(b, idx) for b in rows for idx in indices]
        return self._draws(stream, pairs).reshape(len(rows), len(indices), *self.shape)

    def _draws(self, stream: int, pairs: Sequence[tuple[int, Index]]) -> torch.Tensor:
        """Draws (len(pairs), *shape) of (batch row, index) ``pairs``."""
        seeds = self.member_seeds()
        keys = [seeds[b] for b, _ in pairs]
        if self.source == "device":
            return self._device_draws(stream, keys, [idx for _, idx in pairs])
        # Cast to the working dtype on the host: the same rounding as torch's, and half the bytes
        # to copy to a GPU. Draws are independent, so threads fill them in any order.
        host = np.float32 if self.dtype == torch.float32 else np.float64
        out = np.empty((len(pairs), *self.shape), dtype=host)
        philox = _draw_keys(keys, [_spawn(stream, idx) for _, idx in pairs])

        def fill(share: range) -> None:
            for n in share:
                out[n] = _normal(philox[n], self.shape)

        workers = _workers()
        if workers > 1 and len(pairs) > 1 and out.size >= _THREADED_SIZE:
            # a share a thread: a task per draw costs more than a small draw
            list(_pool(workers).map(fill, [range(w, len(pairs), workers) for w in range(workers)]))
        else:
            fill(range(len(pairs)))
        return torch.from_numpy(out).to(device=self.device, dtype=self.dtype)

    def _device_draws(self, stream: int, keys: list[int], indices: Sequence[Index]) -> torch.Tensor:
        out = torch.empty((len(keys), *self.shape), dtype=self.dtype, device=self.device)
        gen = torch.Generator(device=out.device)
        for n, (key, idx) in enumerate(zip(keys, indices)):
            gen.manual_seed(draw_seed(key, stream, idx))
            out[n] = torch.randn(self.shape, generator=gen, dtype=self.dtype, device=out.device)
        return out

    def subset(self, rows: Sequence[int]) -> "Noise":
        """The noise of batch rows ``rows`` only."""
        keys = tuple(self.keys[b] for b in rows)
        return Noise(self.seed, keys, self.shape, self.dtype, self.device, self.source)

    def prior(self) -> torch.Tensor:
        """Start states y_0 ~ N(0, I) at u_max, (B, *shape)."""
        return self._draw(PRIOR, range(len(self.keys)), [0])[:, 0]

    def path(self, lo: int, hi: int, rows: Sequence[int] | None = None) -> torch.Tensor:
        """xi_j for global steps j in [lo, hi), (B, hi - lo, *shape)."""
        rows = range(len(self.keys)) if rows is None else rows
        return self._draw(PATH, rows, range(lo, hi))

    def path_at(self, rows: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
        """xi_j of step ``steps[i]`` for batch row ``rows[i]``, (len(rows), *shape): a window's
        scattered new points in one call rather than one a row or a point."""
        return self._draws(PATH, list(zip(rows, steps)))

    def corrector(self, block: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrector start velocity (B, *shape) and Brownian increments (B, hi - lo, *shape)."""
        rows = range(len(self.keys))
        v0 = self._draw(CORRECTOR_V0, rows, [block])[:, 0]
        return v0, self._draw(CORRECTOR_PATH, rows, [(block, r) for r in range(lo, hi)])

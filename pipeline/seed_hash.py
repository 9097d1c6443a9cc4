"""numpy's ``SeedSequence`` hash, computed for many keys at once: the same Philox keys as
``SeedSequence(key, spawn_key=spawn).generate_state(2, np.uint64)`` for each key, with one
pass of array operations in place of a Python object per draw.

SeedSequence (after M.E. O'Neill's seed_seq_fe) turns its entropy into 32-bit words, mixes
them into a pool of four with a multiply-xorshift hash whose constant advances on every
use, and draws its output words from the pool with a second such hash. Every constant and
the order of the steps depend only on how many words there are, so for keys with the same
spawn-word count the hash is the same sequence of elementwise operations on each key.
``tests/test_noise.py`` checks it against numpy for keys and spawn keys of every length.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

_U32 = np.uint32
_MASK = 0xFFFFFFFF
_POOL = 4
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875  # the entropy mixer's hash
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED  # the output hash
_MIX_L, _MIX_R = _U32(0xCA01F9DD), _U32(0x4973F715)
_SHIFT = _U32(16)


def words(values: Sequence[int]) -> list[int]:
    """The 32-bit words SeedSequence reads from non-negative integers: each value's, least
    significant first, and one zero word for 0."""
    out = []
    for v in values:
        if v < 0:  # SeedSequence refuses them too (and shifting one right never ends)
            raise ValueError(f"a spawn key holds {v}: expected non-negative integers")
        out.append(v & _MASK)
        v >>= 32
        while v:
            out.append(v & _MASK)
            v >>= 32
    return out


def _hashes(init: int, mult: int, count: int) -> list[tuple[np.uint32, np.uint32]]:
    """(xor, multiply) constants of the first ``count`` uses of a hash starting at ``init``."""
    out, h = [], init
    for _ in range(count):
        nxt = (h * mult) & _MASK
        out.append((_U32(h), _U32(nxt)))
        h = nxt
    return out


def philox_keys(keys: np.ndarray, spawn: np.ndarray) -> np.ndarray:
    """Philox keys (N, 2) uint64 of ``SeedSequence(keys[i], spawn_key=s_i)`` where ``spawn``
    (N, S) uint32 holds the words of each spawn key s_i (S >= 1) and ``keys`` (N,) uint64 the
    entropy, a 64-bit integer each."""
    n, extra = spawn.shape
    lo = (keys & np.uint64(_MASK)).astype(_U32)
    hi = (keys >> np.uint64(32)).astype(_U32)
    zero = np.zeros(n, _U32)
    # a key of one or two words is padded to the pool's four when a spawn key follows
    entropy = [lo, hi, zero, zero, *spawn.T]
    a = iter(_hashes(_INIT_A, _MULT_A, _POOL * _POOL + _POOL * extra))

    def hashmix(value: np.ndarray) -> np.ndarray:
        xor, mul = next(a)
        value = value ^ xor
        value *= mul
        value ^= value >> _SHIFT
        return value

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = x * _MIX_L
        out -= y * _MIX_R
        out ^= out >> _SHIFT
        return out

    pool = [hashmix(entropy[i]) for i in range(_POOL)]
    for src in range(_POOL):  # every pool word into every other
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(_POOL, len(entropy)):  # the spawn words into every pool word
        for dst in range(_POOL):
            pool[dst] = mix(pool[dst], hashmix(entropy[src]))
    state = []
    for i, (xor, mul) in enumerate(_hashes(_INIT_B, _MULT_B, 4)):
        value = pool[i % _POOL] ^ xor
        value *= mul
        value ^= value >> _SHIFT
        state.append(value.astype(np.uint64))
    return np.stack([state[0] | (state[1] << np.uint64(32)),
                     state[2] | (state[3] << np.uint64(32))], -1)

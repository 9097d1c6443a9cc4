"""Peak memory of a stretch of work, per rank: device memory on a GPU, resident memory on CPU.

On Linux the resident high-water mark can be reset (``/proc/self/clear_refs``), so the peak of
one sampler run is measured above what the process already held, not the process's lifetime
peak (which the torch import alone sets)."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import resource
from pathlib import Path

import torch

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


# glibc hands every freed block above its mmap threshold back to the kernel at once, and trims
# its heap's free top soon after, so a model whose activations are that large (a 64x64 U-Net's
# are) faults its memory back in on every call. Below this size it keeps what it frees instead.
# Shipped unconditional pair on 2 CPU threads, 200 steps, 1 member (piadm bench): pc-window
# (p = 65) 21.4 -> 13.4 s at a peak of 751 -> 1203 MiB; sequential-sde about the same time.
KEEP_BELOW = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse (allocations up to ``KEEP_BELOW`` from its heap,
    which it trims only beyond that) rather than return it to the kernel after every model
    call. Returns whether it applied (glibc only; elsewhere nothing changes)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BELOW)
                and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BELOW))


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS, so the next peak is measured from what is live.

    glibc keeps freed heap memory resident (and after large frees it serves later tensors from
    that heap), which would hide the next run's peak; ``malloc_trim`` releases those pages."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def start_peak(device: torch.device) -> int:
    """Reset the high-water mark and return the bytes held now (the baseline)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    _release_free_memory()
    try:
        _CLEAR.write_text("5")
    except OSError:
        pass  # no reset: the peak below is then the process's lifetime peak
    rss = _status_kib("VmRSS")
    return 1024 * rss if rss is not None else 0


def peak_since(device: torch.device, baseline: int) -> int:
    """Bytes of peak memory above ``baseline`` since ``start_peak``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    hwm = _status_kib("VmHWM")
    if hwm is None:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return max(0, 1024 * hwm - baseline)

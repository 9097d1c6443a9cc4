"""Peak memory of a stretch of work, per rank: device memory on a GPU, resident memory on CPU.

On Linux the resident high-water mark can be reset (``/proc/self/clear_refs``), so the peak of
one sampler run is measured above what the process already held, not the process's lifetime
peak (which the torch import alone sets)."""
from __future__ import annotations

import ctypes
import functools
import gc
import math
import os
import resource
from pathlib import Path

import torch

from pipeline.host_memory import status_kib, host_room

_CLEAR = Path("/proc/self/clear_refs")


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library this process runs on, or None. Its own symbols, not
    ``ctypes.util.find_library``, which starts ldconfig and a compiler in a temporary folder:
    under a low ``ulimit -n`` that failed, and an optional allocator setting stopped the job."""
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


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
    rss = status_kib("VmRSS")
    return 1024 * rss if rss is not None else 0


def peak_since(device: torch.device, baseline: int) -> int:
    """Bytes of peak memory above ``baseline`` since ``start_peak``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    hwm = status_kib("VmHWM")
    if hwm is None:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return max(0, 1024 * hwm - baseline)


def available_bytes(device: torch.device, sharing: int = 1) -> tuple[int, str] | None:
    """(bytes this rank may still allocate, where) on ``device``, with ``sharing`` ranks of the
    node sharing it evenly: a GPU's free memory, or the host's (``host_memory.host_room``);
    None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # what torch keeps cached for this process is free to it too (the driver counts it
        # used): earlier work (a plan's cost curve, a calibration) would shrink the room
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free // max(1, sharing), f"free on {device}"
    return host_room(sharing)


def field_bytes(shape, dtype: torch.dtype) -> int:
    """Bytes of one field of ``shape`` in ``dtype``."""
    return math.prod(shape) * torch.finfo(dtype).bits // 8


def ranks_sharing(local_ranks: int, device: torch.device) -> int:
    """How many of a node's ``local_ranks`` share ``device``'s memory: all of them share the
    host's; on GPUs, those that take the same GPU in turn (``layout.choose_device``)."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 1
    return -(-local_ranks // max(1, gpus))


def memory_sharing(world, device) -> int:
    """Every rank (collective): how many ranks share this rank's memory, the node's host
    memory or, on GPUs, one GPU's: counted by the GPU each rank holds, since a job that gives
    each task its own GPU (``--gpus-per-task=1``) shows every rank one device, which a count
    of the node's devices took for one GPU shared by all its ranks."""
    device = torch.device(device)
    if device.type != "cuda":
        return ranks_sharing(world.local_layout()[1], device)
    held = gpus_held(world, device)
    return sum(other == held[world.rank] for other in held)


def gpus_held(world, device) -> list[tuple[str, str | None]]:
    """Every rank (collective, a CPU rank's too: a collective some ranks skipped would hang):
    each rank's (node, the identity of the GPU it holds, None on a CPU), in rank order."""
    import platform

    device = torch.device(device)
    return world.allgather_object((platform.node(), gpu_identity(device)
                                   if device.type == "cuda" else None))


def gpu_identity(device: torch.device) -> str:
    """Which physical GPU ``device`` is: its UUID, or where torch gives none the devices this
    process may see and the index among them."""
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid:
        return str(uuid)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return f"{visible}:{torch.device(device).index or 0}"


# Fields a member holds in any sampler at once, whatever its registered state: its state and
# the model's answer for it
LEAST_FIELDS = 2


def sampler_floor(method: str, points: int, batch: int, field_bytes: int,
                  time_slices: int = 1, theta: str = "") -> int:
    """Bytes a batch of ``batch`` members certainly needs for the sampler's own state (its
    registered buffers per point and member, its corrector ``theta``'s among them, the
    round's ``points`` split over ``time_slices``, which a sequential sampler's slices do not
    split; at least ``LEAST_FIELDS`` a member), before any model call: a floor, so that a
    run refused by it could not have fitted."""
    from pipeline.samplers import REGISTRY

    entry = REGISTRY[method]
    split = 1 if entry.reference == method else max(1, time_slices)
    share = -(-points // split)
    return int(max(entry.state_fields(theta) * share, LEAST_FIELDS) * batch * field_bytes)

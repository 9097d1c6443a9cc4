"""The communicator interface samplers use: a serial one and one over mpi4py.

Samplers receive a communicator explicitly, never a global; a one-rank communicator runs the same
code path as many. Tensors passed to the collectives are reduced element-wise and keep their
shape, dtype and device. ``seconds`` accumulates the wall time spent inside collectives, which
the bench reports as the communication share, and ``tally`` the count and seconds of each kind
of collective. ``with comm.recording(marker) as calls`` records every collective of the block:
its kind, seconds and the value of ``marker`` (a clock of the rank's model time, or 0) in
order, so that the bench can tell a collective's own time from waiting for other ranks, and
waiting for their model calls from waiting for the rest of their work.

torch is imported where a tensor is made, not with the module: `world_comm()` then costs no
torch import, so `piadm status` answers in a fraction of a second.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import types
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

IDLE_POLL_S = 0.002  # an idle barrier's sleep between polls
# A sleeping wait's poll (``MPIComm.poll_s``): 50 to 100 us measured best on 8 ranks sharing 2
# cores; 1 ms adds a poll's latency to every hop of a collective (docs/planning.md)
WAIT_POLL_S = 1e-4
ABORT_GRACE_S = 0.5  # before an abort: time for the launcher to forward the last message

# Environment variables that MPI launchers (mpiexec/Hydra, srun --mpi=pmi2/pmix, Open MPI) set.
LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def _as_tensor(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``array`` (shared, not copied, on the host) as a tensor on ``like``'s device."""
    import torch  # a lookup once imported: microseconds against a collective

    return torch.from_numpy(array).to(like.device)


class SerialComm:
    """A one-rank communicator: every collective is the identity (or zero for exscan)."""

    rank, size, seconds = 0, 1, 0.0
    tally = types.MappingProxyType({})  # one rank talks to no one (read-only: shared)
    poll_s = None  # nothing to wait for

    @contextlib.contextmanager
    def recording(self, marker=None):
        """The collectives called in the block: none, on one rank."""
        yield []

    def exscan_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Exclusive prefix sum over ranks: sum of x on ranks < this rank (zeros on rank 0)."""
        return x.new_zeros(x.shape)

    def allreduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise max over ranks: x itself, a NaN as +inf (as ``MPIComm``'s)."""
        return _nan_as(x, float("inf"))

    def allreduce_min(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise min over ranks: x itself, a NaN as -inf (as ``MPIComm``'s)."""
        return _nan_as(x, float("-inf"))

    def allreduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks: x itself."""
        return x

    def bcast(self, x: torch.Tensor, root: int) -> torch.Tensor:
        """x from rank ``root``: x itself."""
        return x

    def allgather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x stacked by rank, (size, *x.shape)."""
        return x[None]

    def bcast_object(self, obj, root: int = 0):
        """``obj`` from rank ``root``: obj itself."""
        return obj

    def allgather_object(self, obj) -> list:
        """Every rank's ``obj`` by rank: [obj]."""
        return [obj]

    def alltoall_object(self, objs: list) -> list:
        """What every rank sent here, by source rank: the one share, objs[0]."""
        return list(objs)

    def barrier(self, idle: bool = False) -> None:
        """Wait for every rank: no one to wait for."""
        return None

    def split(self, color: int, key: int) -> "SerialComm":
        """The ranks of the same ``color``, ordered by ``key``: this one."""
        return self

    def alone(self) -> "SerialComm":
        """This rank by itself, as a communicator: this one."""
        return self

    def local_layout(self) -> tuple[int, int]:
        """(rank, size) among the ranks on this node."""
        return 0, 1

    def abort(self, code: int) -> None:
        """Stop the job with exit status ``code`` (SystemExit: one process to stop)."""
        raise SystemExit(code)


class MPIComm:
    """A communicator over an mpi4py ``Comm``. Tensors travel through host numpy buffers, so
    any MPI works (no CUDA-aware build needed); the copies are timed with the collective."""

    def __init__(self, comm, poll_s: float | None = None):
        from mpi4py import MPI

        self._mpi, self._comm = MPI, comm
        self.rank, self.size, self.seconds = comm.Get_rank(), comm.Get_size(), 0.0
        self.tally: dict[str, list] = {}  # kind -> [count, seconds]
        # while recording: each call's (kind, seconds, marker's value), marker a zero-argument
        # callable (``recording``)
        self._calls: list[tuple[str, float, float]] | None = None
        self._marker = None
        # None: the buffer collectives wait inside MPI, which spins on the core; seconds: they
        # are started nonblocking and polled with sleeps of this length in between, so that a
        # waiting rank leaves its core to the ranks still computing (``parallel.wait``)
        self.poll_s = poll_s
        self._layout: tuple[int, int] | None = None  # local_layout's, once asked

    def _run(self, blocking, nonblocking, *args, **kwargs) -> None:
        """One buffer collective, waited for as ``poll_s`` says."""
        if self.poll_s is None:
            blocking(*args, **kwargs)
            return
        request = nonblocking(*args, **kwargs)
        while not request.Test():
            time.sleep(self.poll_s)

    def _count(self, kind: str, start: float) -> None:
        spent = time.perf_counter() - start
        entry = self.tally.setdefault(kind, [0, 0.0])
        entry[0] += 1
        entry[1] += spent
        self.seconds += spent
        if self._calls is not None:
            self._calls.append((kind, spent, self._marker() if self._marker else 0.0))

    @contextlib.contextmanager
    def recording(self, marker=None):
        """Record every collective called in the block, in order, into the list it yields:
        (kind, seconds, ``marker()``), ``marker`` a zero-argument callable (the rank's model
        clock) or None (0)."""
        self._calls, self._marker = [], marker
        try:
            yield self._calls
        finally:
            self._calls, self._marker = None, None

    @staticmethod
    def _start(x: torch.Tensor) -> float:
        """The clock at a collective's start, after x's device has finished computing it: the
        wait for a GPU's queued kernels is the rank's compute, not communication."""
        if x.is_cuda:
            import torch

            torch.cuda.synchronize(x.device)
        return time.perf_counter()

    def _reduce(self, x: torch.Tensor, op, exclusive: bool = False) -> torch.Tensor:
        start = self._start(x)
        send = np.ascontiguousarray(x.detach().cpu().numpy())
        recv = np.zeros_like(send)
        if exclusive:
            self._run(self._comm.Exscan, self._comm.Iexscan, send, recv, op=op)
            if self.rank == 0:  # MPI leaves rank 0's Exscan result undefined
                recv[...] = 0
        else:
            self._run(self._comm.Allreduce, self._comm.Iallreduce, send, recv, op=op)
        out = _as_tensor(recv, x)
        self._count("Exscan" if exclusive else "Allreduce", start)
        return out

    def exscan_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Exclusive prefix sum over ranks: sum of x on ranks < this rank (zeros on rank 0)."""
        return self._reduce(x, self._mpi.SUM, exclusive=True)

    def allreduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise max of x over ranks, every rank's x of one shape and dtype; a NaN
        counts as +inf. MPI's MAX of a NaN and a number depends on the order it meets them, so
        ranks would get different answers (some NaN, some the number) and part ways: a Picard
        block then swept on some ranks and stopped on others, and the job hung."""
        return self._reduce(_nan_as(x, float("inf")), self._mpi.MAX)

    def allreduce_min(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise min of x over ranks, every rank's x of one shape and dtype; a NaN
        counts as -inf, for the reason ``allreduce_max`` gives."""
        return self._reduce(_nan_as(x, float("-inf")), self._mpi.MIN)

    def allreduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of x over ranks, every rank's x of one shape and dtype."""
        return self._reduce(x, self._mpi.SUM)

    def bcast(self, x: torch.Tensor, root: int) -> torch.Tensor:
        """x from rank ``root``; other ranks pass a tensor of the same shape and dtype."""
        start = self._start(x)
        buf = np.ascontiguousarray(x.detach().cpu().numpy())
        self._run(self._comm.Bcast, self._comm.Ibcast, buf, root=root)
        out = _as_tensor(buf, x)
        self._count("Bcast", start)
        return out

    def allgather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x stacked by rank, (size, *x.shape); one buffer-based Allgather."""
        start = self._start(x)
        send = np.ascontiguousarray(x.detach().cpu().numpy())
        recv = np.empty((self.size, *send.shape), dtype=send.dtype)
        self._run(self._comm.Allgather, self._comm.Iallgather, send, recv)
        out = _as_tensor(recv, x)
        self._count("Allgather", start)
        return out

    def _timed(self, kind: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self._count(kind, start)
        return out

    def bcast_object(self, obj, root: int = 0):
        """``obj`` from rank ``root``, pickled: for setup, never on a sampler's hot path."""
        return self._timed("bcast (pickled)", self._comm.bcast, obj, root=root)

    def allgather_object(self, obj) -> list:
        """Every rank's ``obj``, by rank, pickled: for setup, not on a hot path."""
        return self._timed("allgather (pickled)", self._comm.allgather, obj)

    def alltoall_object(self, objs: list) -> list:
        """objs[r] goes to rank r; returns what every rank sent here, by source rank. The
        rank's own share stays in memory (never pickled)."""
        own = objs[self.rank]
        got = self._timed("alltoall (pickled)", self._comm.alltoall,
                          [None if r == self.rank else o
                                                for r, o in enumerate(objs)])
        got[self.rank] = own
        return got

    def barrier(self, idle: bool = False) -> None:
        """Wait for every rank; ``idle``: sleeping between polls (a long wait on a node
        whose cores another rank needs)."""
        if not idle:
            self._timed("Barrier", self._comm.Barrier)
            return
        request = self._comm.Ibarrier()
        while not request.Test():
            time.sleep(IDLE_POLL_S)

    def split(self, color: int, key: int) -> "MPIComm":
        """A communicator of the ranks with this ``color``, ordered by ``key`` (collective)."""
        return MPIComm(self._comm.Split(color, key), self.poll_s)

    def alone(self) -> SerialComm:
        """This rank by itself, as a communicator (not collective): for work every rank
        does whole, e.g. a replicated window's scans."""
        return SerialComm()

    def local_layout(self) -> tuple[int, int]:
        """(rank, size) among the ranks sharing this node's memory: collective the first time,
        then remembered (the ranks stay where they are)."""
        if self._layout is None:
            node = self._comm.Split_type(self._mpi.COMM_TYPE_SHARED, key=self.rank)
            self._layout = node.Get_rank(), node.Get_size()
            node.Free()
        return self._layout

    def abort(self, code: int) -> None:
        """End every rank of the job now (an exception on one rank must not hang the others),
        after a moment for the launcher to forward what this rank just printed: an abort
        tears down the pipes it reads, and the reason would be lost with them."""
        sys.stderr.flush()
        sys.stdout.flush()
        time.sleep(ABORT_GRACE_S)
        self._comm.Abort(code)


def launched_by_mpi() -> bool:
    """Whether an MPI launcher started this process (``PIADM_MPI=0/1`` overrides)."""
    forced = os.environ.get("PIADM_MPI")
    if forced is not None:
        if forced not in ("0", "1"):  # "true" read as off: every rank a job of its own
            from pipeline.errors import ConfigError

            raise ConfigError(f"PIADM_MPI={forced}: give 1 (launched by MPI) or 0 (not), or "
                              "unset it to have piadm tell")
        return forced == "1"
    return any(v in os.environ for v in LAUNCHER_VARS)


_SAID: list = []  # whether _say_if_srun_joined_none said it in this process


def _say_if_srun_joined_none() -> None:
    """srun without an MPI plugin (``--mpi=none``, or a site default that is not one)
    starts its tasks as separate processes: each runs as a job of its own (sharing a store
    by its claims), which is seldom what was meant. Said once, by the first task."""
    try:
        tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))
    except ValueError:
        return
    if tasks > 1 and os.environ.get("SLURM_PROCID", "0") == "0" and not _SAID:
        _SAID.append(tasks)
        print(f"piadm: srun started {tasks} tasks, but no MPI joined them: each runs as a "
              "job of its own; give srun the MPI plugin your MPI needs (--mpi=pmi2 for the "
              "pip MPICH, or your site's) for them to work as one", file=sys.stderr,
              flush=True)


def world_comm():
    """MPI.COMM_WORLD when an MPI launcher started us, else the serial communicator; a
    ConfigError where a launcher did but mpi4py cannot be imported."""
    if not launched_by_mpi():
        _say_if_srun_joined_none()
        return SerialComm()
    try:
        from mpi4py import MPI
    except ImportError as err:  # not installed, or its MPI library not found
        from pipeline.errors import ConfigError

        told = ("PIADM_MPI=1" if os.environ.get("PIADM_MPI") == "1" else
                next(f"{v} is set" for v in LAUNCHER_VARS if v in os.environ))
        raise ConfigError(f"started by an MPI launcher ({told}), but mpi4py cannot be "
                          f"imported ({err}): install it in this environment (pip install "
                          "'piadm[mpi]'), or run without mpiexec/srun for one process") from None
    return MPIComm(MPI.COMM_WORLD)


def _nan_as(x: torch.Tensor, value: float) -> torch.Tensor:
    """x with its NaNs replaced by ``value`` (x itself where it holds no floats). One
    elementwise op, with no test of whether any is NaN: that test would wait for a GPU's
    queued work on every serial sweep."""
    return x.masked_fill(x.isnan(), value) if x.is_floating_point() else x

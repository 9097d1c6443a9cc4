"""Run under ``mpiexec``: ``piadm`` with the model failing on one rank after a few calls, to
check that every rank ends promptly. Usage: python tests/mpi_fail.py RANK HOW PIADM-ARGS...,
HOW ``raise`` (the call raises, told as a network's failure at its line), ``bug`` (the same,
raised from piadm's own code: told with its traceback) or ``nan`` (it answers NaN, which only
that rank sees), or
``write``: that rank's second batch write fails as on a full disk, ``claim``: its second
batch claim does, or ``thread`` (``beat``): its background writer's (heartbeat's) thread
cannot start.
"""
import sys

from models.grf import GaussianRandomField
from pipeline import cli
from pipeline.comm import world_comm


def _fail_after(calls: int, how: str):
    original, seen = GaussianRandomField.__call__, [0]

    def failing(self, x, u):
        seen[0] += 1
        if seen[0] > calls:
            if how == "nan":
                return original(self, x, u) * float("nan")
            raise RuntimeError("injected failure: this rank's model call broke")
        return original(self, x, u)

    if how == "bug":  # its code as if piadm's own file's: no frame of the user's to name
        failing.__code__ = failing.__code__.replace(co_filename=cli.__file__)
    return failing


if __name__ == "__main__":
    if world_comm().rank == int(sys.argv[1]) and sys.argv[2] == "write":
        from conftest import second_write_fails
        from pipeline import ensemble

        ensemble.write_batch = second_write_fails(ensemble.write_batch)
    elif world_comm().rank == int(sys.argv[1]) and sys.argv[2] == "claim":
        from conftest import second_write_fails
        from pipeline import claimed

        claimed.claim = second_write_fails(claimed.claim)
    elif world_comm().rank == int(sys.argv[1]) and sys.argv[2] in ("thread", "beat"):
        import threading

        start = threading.Thread.start
        name = {"thread": "piadm-writer", "beat": "piadm-heartbeat"}[sys.argv[2]]

        def no_room(thread):
            if thread.name == name:  # as under a low ulimit -v
                raise RuntimeError("can't start new thread")
            start(thread)

        threading.Thread.start = no_room
    elif world_comm().rank == int(sys.argv[1]):
        GaussianRandomField.__call__ = _fail_after(3, sys.argv[2])
    sys.exit(cli.main(sys.argv[3:]))

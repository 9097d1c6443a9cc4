"""Run under ``mpiexec``: ``piadm`` with the model failing on one rank after a few calls, to
check that every rank ends promptly. Usage: python tests/mpi_fail.py RANK PIADM-ARGS...
"""
import sys

from models.grf import GaussianRandomField
from pipeline import cli
from pipeline.comm import world_comm


def _fail_after(calls: int):
    original, seen = GaussianRandomField.__call__, [0]

    def failing(self, x, u):
        seen[0] += 1
        if seen[0] > calls:
            raise RuntimeError("injected failure: this rank's model call broke")
        return original(self, x, u)

    return failing


if __name__ == "__main__":
    if world_comm().rank == int(sys.argv[1]):
        GaussianRandomField.__call__ = _fail_after(3)
    sys.exit(cli.main(sys.argv[2:]))

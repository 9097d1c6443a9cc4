"""Run under ``mpiexec -n 2``: ``api.sample`` given another config on rank 1, or one that
is invalid on rank 1 only, is refused on both ranks before anything is written, and a plain
mpi4py communicator is taken as it is.
Each rank writes what it saw to FOLDER/said{rank}.txt (the ranks' stdout would interleave).
Usage: python tests/mpi_api.py FOLDER"""
import sys

from mpi4py import MPI

from pipeline import api

rank, folder = MPI.COMM_WORLD.Get_rank(), sys.argv[1]
said = []
base = {"model.shape": [8, 8], "sampler.steps": 20, "sampler.method": "sequential-sde",
        "ensemble.members": 2, "ensemble.batch_size": 2, "parallel.time_slices": 2}
try:  # an output path made from the rank: the ranks would not agree on the store
    api.sample(api.load_config("jobs/configs/grf.toml",
                               {**base, "output.path": f"{folder}/rank{rank}.zarr"}))
except Exception as err:
    said.append(f"raised {type(err).__name__}: {err}")
try:  # a config invalid on rank 1 only (a file one node lacks): rank 0 must not wait for it
    api.sample({"model": {"kind": "grf", "shape": [8, 8]},
                "sampler": {"steps": 20 if rank == 0 else -1, "method": "sequential-sde"},
                "output": {"path": f"{folder}/bad.zarr"}})
except Exception as err:
    said.append(f"raised {type(err).__name__}: {err}")
summary = api.sample(api.load_config("jobs/configs/grf.toml",
                                     {**base, "output.path": f"{folder}/same.zarr"}),
                     comm=MPI.COMM_WORLD)
said.append(f"sampled {summary.members}")
with open(f"{folder}/said{rank}.txt", "w") as out:
    out.write("\n".join(said))

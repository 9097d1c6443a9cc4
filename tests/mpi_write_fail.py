"""Run under ``mpiexec -n 2`` (two time slices of one group): ``api.sample`` with the lead
rank's second batch write failing (a full disk), to check that every rank raises and none
waits in a collective. Usage: python tests/mpi_write_fail.py STORE background|inline
Each rank writes what it raised to STORE.said{rank} (the ranks' stdout can interleave)."""
import sys

from conftest import second_write_fails
from pipeline import api, ensemble

ensemble.write_batch = second_write_fails(ensemble.write_batch)
cfg = api.load_config("jobs/configs/grf.toml", {
    "model.shape": [8, 8], "sampler.steps": 20, "sampler.method": "sequential-sde",
    "ensemble.members": 8, "ensemble.batch_size": 2, "parallel.time_slices": 2,
    "output.background": sys.argv[2] == "background", "output.path": sys.argv[1]})
said = ""
try:
    api.sample(cfg)
except Exception as err:
    said = f"raised {type(err).__name__}: {err}"
with open(f"{sys.argv[1]}.said{api.world().rank}", "w") as out:
    out.write(said)

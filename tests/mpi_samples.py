"""Run under ``mpiexec -n N``: sample a small ensemble with several samplers on a rank grid
of N / time_slices groups and save every member on rank 0 (``tests/test_mpi.py`` compares
the layouts). Usage: python tests/mpi_samples.py OUT.npz TIME_SLICES [WAIT [CASES]], WAIT a
``parallel.wait`` value (default "auto"), CASES names of ``CASES`` separated by commas
(default all).
"""
import dataclasses
import sys

import numpy as np
import torch

from models.grf import GaussianRandomField
from pipeline.comm import world_comm
from pipeline.decomposition import share
from pipeline.grids import make_grid
from pipeline.layout import place_rank, rank_grid
from pipeline.noise import Noise
from pipeline.run import member_batches, sample_batch
from pipeline.samplers import Options

CASES = {  # name: (method, dtype, options, noise source)
    "sde64": ("piadm-sde", torch.float64, Options(max_sweeps=6), "host"),
    "ode64": ("piadm-ode", torch.float64, Options(max_sweeps=6), "host"),
    "sde32": ("piadm-sde", torch.float32, Options(max_sweeps=6), "host"),
    "ode32": ("piadm-ode", torch.float32, Options(max_sweeps=6), "host"),
    "sde64tol": ("piadm-sde", torch.float64, Options(max_sweeps=20, tol=0.05), "host"),
    "sde64device": ("piadm-sde", torch.float64, Options(max_sweeps=20, tol=0.05), "device"),
    "window64": ("window", torch.float64, Options(window=20, tol=0.05), "host"),
    "windowode64": ("window-ode", torch.float64, Options(window=20, tol=0.05), "host"),
    "window32": ("window", torch.float32, Options(window=20, tol=0.05), "host"),
    "pcwindow64": ("pc-window", torch.float64, Options(window=20, tol=1e-3), "host"),
    "pcwindowode64": ("pc-window-ode", torch.float64, Options(window=20, tol=1e-5), "host"),
    "pcwindow32": ("pc-window", torch.float32, Options(window=20, tol=1e-3), "host"),
    # every rank keeps the whole window and evaluates an even share of its points
    "pcwindowrep64": ("pc-window", torch.float64,
                      Options(window=20, tol=1e-3, window_split="replicated"), "host"),
    "pcwindowoderep64": ("pc-window-ode", torch.float64,
                         Options(window=20, tol=1e-5, window_split="replicated"), "host"),
    "pcwindowrep32": ("pc-window", torch.float32,
                      Options(window=20, tol=1e-3, window_split="replicated"), "host"),
    "pcwindowsecant64": ("pc-window", torch.float64,
                         Options(window=20, tol=1e-3, theta="secant"), "host"),
    "pcwindowsecant32": ("pc-window", torch.float32,
                         Options(window=20, tol=1e-3, theta="secant"), "host"),
    "pcwindowsecantrep64": ("pc-window", torch.float64,
                            Options(window=20, tol=1e-3, theta="secant",
                                    window_split="replicated"), "host"),
    "dpmppwindow64": ("dpmpp-2m-window", torch.float64, Options(tol=1e-4), "host"),
}


def main(out: str, time_slices: int, wait: str = "auto", cases: str = "") -> None:
    world = world_comm()
    place_rank(world, wait=wait)
    ranks = rank_grid(world, time_slices)
    model = GaussianRandomField((12, 10))
    grid = make_grid("ou", 60, u_min=1e-3, u_max=10.0, block_size=20)
    mine = share(member_batches(6, 2), ranks.groups, ranks.group)
    results = {}
    for name in cases.split(",") if cases else CASES:
        method, dtype, options, source = CASES[name]
        options = dataclasses.replace(options, data_bound=model.data_bound)
        fields = {}
        for members in mine:
            noise = Noise.members(4, 0, members, model.shape, dtype, source=source)
            batch = sample_batch(model, noise, method=method, grid=grid, options=options,
                                 comm=ranks.slices)
            fields.update({m: batch.fields[i].double().numpy() for i, m in enumerate(members)})
        if ranks.slices.rank != 0:
            fields = {}
        merged = {}
        for part in world.allgather_object(fields):
            merged.update(part)
        results[name] = np.stack([merged[m] for m in range(6)])
    if world.rank == 0:
        np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])

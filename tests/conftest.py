"""Shared test helpers: a small conditioning input store and config overrides."""
import numpy as np
import pandas as pd
import pytest
import xarray as xr

SHAPE = (16, 16)


# The files that took longest (seconds on 2 busy cores, `--junitxml`, 2026-12-07): with
# `--no-loadscope-reorder` pytest-xdist deals files out in collected order, so these go first,
# longest first, and the two workers of -n 2 finish together (dealt out by test count instead,
# the README's one long test came last and ran 70 s on one worker alone). The SLURM tests
# mostly wait on their jobs: started early, another worker's tests fill the core they leave.
LONGEST_FILES = ("test_mpi.py",         # 185
                 "test_readme.py",      # 112
                 "test_slurm.py",       # 95 (where a SLURM answers)
                 "test_train.py",       # 77
                 "test_preemption.py")  # 75


def pytest_collection_modifyitems(config, items):
    """Files run longest first: those in ``LONGEST_FILES``, then the other files with a test
    marked ``slow``, then the rest; a file's tests stay together (its module fixtures are built
    once, also without xdist), its ``slow`` tests first."""
    slow_files = {item.path.name for item in items if item.get_closest_marker("slow")}

    def rank(item):
        name = item.path.name
        first = (LONGEST_FILES.index(name) if name in LONGEST_FILES
                 else len(LONGEST_FILES) + (name not in slow_files))
        return first, name, item.get_closest_marker("slow") is None

    items.sort(key=rank)


def make_input(path, times: int = 6, nan_at: int | None = None) -> str:
    """A Zarr store with ``vort(time, y, x)``: smooth fields with daily time labels."""
    rng = np.random.default_rng(0)
    y, x = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    data = np.stack([3 * np.sin(2 * np.pi * (x + t) / SHAPE[1]) + np.cos(2 * np.pi * y / SHAPE[0])
                     + 0.1 * rng.standard_normal(SHAPE) for t in range(times)]) + 5.0
    if nan_at is not None:
        data[nan_at, 3, 4] = np.nan
    ds = xr.Dataset({"vort": (("time", "y", "x"), data.astype("float32"))},
                    coords={"time": pd.date_range("2020-01-01", periods=times)})
    ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False)
    return str(path)


def conditional_sets(input_path, output_path, *extra) -> list[str]:
    """``--set`` items of a small conditioned ensemble (6 items of 6 members of 16x16) for the
    tests of stores, inputs and scores: sampled sequentially, which takes half the CPU of the
    config's default sampler on fields this small (0.5 s against 1.1 s a ``piadm sample``, its
    start-up included; a later ``extra`` item wins)."""
    items = ["model.shape=[16, 16]", "model.condition=mean", f"input.path={input_path}",
             "input.variable=vort", "sampler.method=sequential-sde", "sampler.steps=60",
             "sampler.block_size=20", "sampler.tol=0.05", "ensemble.members=6",
             "ensemble.batch_size=2", f"output.path={output_path}", *extra]
    return sum((["--set", s] for s in items), [])


@pytest.fixture(autouse=True, scope="session")
def calibration_cache(tmp_path_factory):
    """Calibrations (sampler.tol = "auto") go to a cache of the test session's own."""
    import os

    path = tmp_path_factory.mktemp("piadm-cache")
    old = os.environ.get("PIADM_CACHE")
    os.environ["PIADM_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("PIADM_CACHE", None)
    else:
        os.environ["PIADM_CACHE"] = old


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Each test starts on one torch thread, as ``pipeline.layout.cpu_threads`` gives the small
    fields tests use: a second thread has nothing to share there, and on a busy core it made
    the 8x8 FFTs of a 1000-step run 7 times slower. Tests that go through ``place_rank`` (the
    CLI and the API) still set their own."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def input_store(tmp_path):
    return make_input(tmp_path / "input.zarr")


def second_write_fails(write):
    """``write`` (``done_record.write_batch``) whose second call fails as a full disk does."""
    import errno

    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(*args, **kwargs)

    return failing

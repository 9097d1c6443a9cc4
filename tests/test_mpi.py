"""MPI runs as subprocesses (``mpiexec -n N``): results independent of the rank layout, a
failure on one rank ending the whole job, collective errors exiting cleanly."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from mpi_samples import CASES

from pipeline.cli import main

pytest.importorskip("mpi4py")
ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
if not Path(MPIEXEC).exists():
    MPIEXEC = shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")
LAYOUTS = [(1, 1), (2, 2), (4, 4), (4, 2)]  # (ranks, time slices): 4 ranks, 2 = 2 x 2 grid
SMALL = ["model.shape=[12, 10]", "sampler.steps=60", "sampler.block_size=20",
         "ensemble.members=6", "ensemble.batch_size=2", "sampler.max_sweeps=8"]


# Layouts agree to rounding: the stopping decisions match, and a flip near a threshold moves a
# member by less than these bounds (relative norms, per dtype)
# float64: the layouts differ by the order of sums alone (3e-15 at most, measured); 1e-10 let
# a coefficient rounded to float32 on 3 or more slices pass (dpmpp-2m-window, 2e-11)
LAYOUT_BOUND = {"float64": 1e-13, "float32": 1e-5}


def relative(got, want) -> float:
    """|got - want| / |want| over whole arrays."""
    got, want = np.asarray(got), np.asarray(want)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def mpirun(n: int, args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _sets(items):
    return sum((["--set", s] for s in items), [])


# On 4 ranks the float64 cases only: the float32 ones repeat their samplers (their own bound
# is checked on 2 ranks), and 4 ranks oversubscribe the 2 cores tests run on.
FLOAT64_CASES = ",".join(name for name, case in CASES.items() if case[1] == torch.float64)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    out = {}
    for n, slices in LAYOUTS:
        path = tmp_path_factory.mktemp("mpi") / f"r{n}x{slices}.npz"
        cases = ["auto", FLOAT64_CASES] if n == 4 else []
        proc = mpirun(n, ["tests/mpi_samples.py", str(path), str(slices), *cases])
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[(n, slices)] = dict(np.load(path))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_every_layout_gives_the_one_rank_ensemble(layouts, layout):
    ref, got = layouts[(1, 1)], layouts[layout]
    for case, y in got.items():
        rel = relative(y, ref[case])
        assert rel <= LAYOUT_BOUND["float64" if "64" in case else "float32"], (case, rel)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_a_replicated_window_gives_the_one_rank_ensemble_bit_for_bit(layouts, layout):
    """Every rank does the one-rank round on the same scores: only the model's batches differ,
    and the GRF evaluates each member alone."""
    ref, got = layouts[(1, 1)], layouts[layout]
    cases = [case for case in got if "rep" in case]
    assert cases
    for case in cases:
        assert np.array_equal(got[case], ref[case]), case


@pytest.mark.slow
@pytest.mark.parametrize("ranks,wait", [(2, "sleep"), (4, "spin")])
def test_waiting_by_sleeping_or_spinning_gives_the_one_rank_ensemble(layouts, tmp_path, ranks,
                                                                      wait):
    """parallel.wait changes how a rank waits, never what the collectives return."""
    path = tmp_path / "samples.npz"
    cases = ("pcwindow64", "sde64", "window64")
    proc = mpirun(ranks, ["tests/mpi_samples.py", str(path), str(ranks), wait, ",".join(cases)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, ref = dict(np.load(path)), layouts[(1, 1)]
    assert sorted(got) == sorted(cases)
    for case in cases:
        rel = relative(got[case], ref[case])
        assert rel <= LAYOUT_BOUND["float64"], (case, rel)


def test_sample_on_a_two_by_two_grid_writes_the_serial_store(tmp_path):
    serial, grid = tmp_path / "serial.zarr", tmp_path / "grid.zarr"
    assert main(["sample", "jobs/configs/grf.toml", *_sets(SMALL + [f"output.path={serial}"])]) == 0
    proc = mpirun(4, ["-m", "pipeline.cli", "sample", "jobs/configs/grf.toml",
                      *_sets(SMALL + [f"output.path={grid}", "parallel.time_slices=2"])])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 ranks = 2 groups x 2 time slices" in proc.stderr
    a, b = xr.open_zarr(serial), xr.open_zarr(grid)
    # the history says which layout wrote the members (they agree with one rank's to rounding)
    assert b.attrs["history"].splitlines()[-1].endswith(
        "piadm wrote 6 members on 4 ranks = 2 groups x 2 time slices, window split slots")
    assert relative(b.field, a.field) <= LAYOUT_BOUND["float32"] and a.field.dtype == np.float32
    assert (a.rounds.values == b.rounds.values).all()


@pytest.mark.parametrize("how, said", [
    ("raise", "piadm: error on rank 2: the network failed in a call of 4 member(s) "
              "(RuntimeError: injected failure"),  # a frame of the user's: its line named
    ("bug", "rank 2 failed, aborting all 4 ranks")])  # piadm's own: its traceback
def test_an_exception_on_one_rank_ends_every_rank_promptly(tmp_path, how, said):
    # a rank left waiting hangs past the timeout (TimeoutExpired): no wall-time bound here,
    # which a loaded machine (3x slower) broke
    proc = mpirun(4, ["tests/mpi_fail.py", "2", how, "sample", "jobs/configs/grf.toml",
                      *_sets([f"output.path={tmp_path / 'f.zarr'}", "parallel.time_slices=2",
                              "sampler.tol=1e-3"])],
                  timeout=60)
    assert proc.returncode != 0
    assert "injected failure" in proc.stderr and said in proc.stderr, proc.stderr


@pytest.mark.parametrize("how, doing", [("write", "writing members to"),
                                        ("claim", "claiming a batch of")])
def test_a_write_failing_on_one_rank_ends_the_job_on_one_line_without_an_abort(tmp_path, how,
                                                                             doing):
    """After the ranks agreed that a write failed, the failing rank raised its own error as
    if alone: a line from each rank and MPI's abort, for a full disk (exit 2 still). A batch
    claim failing in one group of several was raised by that group alone (through the API
    the other group waited forever)."""
    out = tmp_path / "w.zarr"
    proc = mpirun(2, ["tests/mpi_fail.py", "1", how, "sample", "jobs/configs/grf.toml",
                      *_sets([f"output.path={out}", "ensemble.members=8",
                              "ensemble.batch_size=2", "sampler.method=sequential-sde",
                              "model.shape=[8, 8]", "sampler.steps=20"])],
                  timeout=90)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(
        f"piadm: error: {doing} {out} failed: No space left on device"), errors
    assert errors[0].endswith("the members written before it are kept: fix the cause (free "
                              "space, the mount) and rerun the same command to finish (on "
                              "rank(s) 1 of 2)"), errors
    assert "Abort" not in proc.stderr


@pytest.mark.parametrize("rank, how, what, fix", [
    ("1", "thread", "the background writer's thread", "set output.background = false"),
    ("0", "beat", "the claims' heartbeat thread", "was met; raise it")])
def test_a_thread_that_cannot_start_on_one_rank_ends_the_job_on_one_line(tmp_path, rank, how,
                                                                         what, fix):
    """The writer is made on each group's lead only, the heartbeat on rank 0: a thread
    failing to start (no room for its stack) was that rank's error alone, a line from it and
    MPI's abort (the heartbeat's a traceback)."""
    out = tmp_path / "t.zarr"
    proc = mpirun(2, ["tests/mpi_fail.py", rank, how, "sample", "jobs/configs/grf.toml",
                      *_sets([f"output.path={out}", "ensemble.members=4",
                              "sampler.method=sequential-sde", "model.shape=[8, 8]",
                              "sampler.steps=10"])],
                  timeout=90)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"piadm: error: {what} could not start"), (
        errors)
    assert errors[0].endswith(f"{fix} (on rank(s) {rank} of 2)"), errors
    assert "Abort" not in proc.stderr


def test_threads_past_the_nodes_cores_are_refused_on_one_line(tmp_path):
    """Each rank refused parallel.threads past the node's cores on its own: the line twice,
    from rank 1 and rank 0, and MPI's abort."""
    proc = mpirun(2, ["-m", "pipeline.cli", "sample", "jobs/configs/grf.toml",
                      *_sets([f"output.path={tmp_path / 'c.zarr'}",
                              f"parallel.threads={os.cpu_count() + 1}"])], timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "parallel.threads" in line]
    assert len(errors) == 1 and errors[0].startswith(
        f"piadm: error: config: parallel.threads = {os.cpu_count() + 1} is more than"), errors
    assert "Abort" not in proc.stderr and not (tmp_path / "c.zarr").exists()


def test_a_nan_on_one_time_slice_of_a_picard_block_ends_every_rank(tmp_path):
    """MPI's MAX of a NaN and a number depends on the order it meets them: the block's
    residual was NaN on some ranks and a number on others, so some stopped sweeping while the
    others swept on, and the job hung in mismatched collectives (SIGTERM did not end it)."""
    # a hang meets the timeout (TimeoutExpired)
    proc = mpirun(3, ["tests/mpi_fail.py", "1", "nan", "sample", "jobs/configs/grf.toml",
                      *_sets([f"output.path={tmp_path / 'n.zarr'}", "parallel.time_slices=3",
                              "sampler.method=piadm-sde", "sampler.block_size=12",
                              "sampler.on_divergence=error"])],
                  timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Picard residual went NaN/Inf" in proc.stderr


def test_a_member_gone_nan_in_one_group_ends_the_job_on_one_line_without_an_abort(tmp_path):
    """A NaN member (a failure piadm names) in one of two groups aborted the job (MPI_Abort:
    srun reports 137), killing the other group mid-batch, where the README promises one line
    and exit 2 with the members written kept."""
    out = tmp_path / "n.zarr"
    proc = mpirun(2, ["tests/mpi_fail.py", "1", "nan", "sample", "jobs/configs/grf.toml",
                      *_sets([f"output.path={out}", *SMALL, "sampler.method=sequential-sde"])],
                  timeout=90)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "went NaN/Inf" in line]
    assert len(lines) == 1 and "(on rank(s) 1 of 2)" in lines[0], proc.stderr[-2000:]
    assert "Abort" not in proc.stderr
    done = zarr.open_group(out, mode="r")["done"][:]
    assert 0 < done.sum() < done.size  # the other group's members kept, the NaN one not


@pytest.mark.parametrize("writer", ["background", "inline"])
def test_a_failed_write_on_the_lead_rank_is_raised_on_every_rank_through_the_api(tmp_path,
                                                                                 writer):
    out = tmp_path / "w.zarr"
    proc = mpirun(2, ["tests/mpi_write_fail.py", str(out), writer], timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    raised = sorted(line for rank in (0, 1)
                    for line in Path(f"{out}.said{rank}").read_text().splitlines()
                    if line.startswith("raised"))
    assert raised == [f"raised WriteFailed: writing members to {out} failed: No space left on "
                      "device; the members written before it are kept: fix the cause (free "
                      "space, the mount) and rerun the same command to finish (on rank(s) 0 "
                      "of 2)"] * 2
    assert int(zarr.open_group(out, mode="r")["done"][:].sum()) == 2  # the first batch, kept


def test_ranks_given_other_configs_through_the_api_are_refused_on_every_rank(tmp_path):
    """Also a config invalid on one rank only: before, that rank raised alone and the other
    waited for it in the configs' comparison."""
    proc = mpirun(2, ["tests/mpi_api.py", str(tmp_path)], timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for rank in (0, 1):
        raised, invalid, sampled = (tmp_path / f"said{rank}.txt").read_text().splitlines()
        assert raised.startswith("raised ConfigError: api.sample: rank(s) 1 of 2 were given "
                                 "another config than rank 0")
        assert invalid.startswith("raised ConfigError: config: sampler.steps = -1 must be")
        assert invalid.endswith("(on rank(s) 1 of 2)")
        assert sampled == "sampled 2"  # then a plain mpi4py communicator samples
    assert not list(tmp_path.glob("rank*"))  # refused before anything was written


def test_ranks_of_the_cli_given_other_configs_are_refused_on_every_rank(tmp_path):
    """Two ranks whose configs differ (as a PIADM_SET or a config file differing between
    nodes would make them), or their options (a dry run on one): one clean error, nothing
    written."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # the CLI, saying too whether torch was imported: a refusal needs none of its seconds
    cli = ("import sys\nfrom pipeline.cli import main\ncode = main(sys.argv[1:])\n"
           "print('torch imported:', 'torch' in sys.modules)\nsys.exit(code)")
    rank = [sys.executable, "-c", cli, "sample", "jobs/configs/grf.toml",
            *_sets([f"output.path={tmp_path / 'x.zarr'}", "model.shape=[8, 8]",
                    "sampler.steps=20"])]
    # a config that fails its checks on one rank only: that rank stopped alone, and the other
    # waited for it forever in the configs' comparison
    for other in (["--set", "sampler.seed=7"], ["--dry-run"], ["--set", "sampler.method=pc-windw"]):
        proc = subprocess.run([MPIEXEC, "-n", "1", *rank, ":", "-n", "1", *rank, *other],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("piadm: error")]
        assert len(errors) == 1, errors
        if "pc-windw" in other[-1]:
            assert errors[0].startswith("piadm: error: config: sampler.method = 'pc-windw' is "
                                        "unknown") and errors[0].endswith(" (on rank(s) 1 of 2)")
        else:
            assert errors[0].startswith("piadm: error: piadm sample: rank(s) 1 of 2 were given "
                                        "another config or options than rank 0"), errors
        assert not (tmp_path / "x.zarr").exists()
        # (the two ranks' lines may interleave)
        assert proc.stdout.count("False") == 2 and "True" not in proc.stdout, proc.stdout


def test_ranks_started_in_other_folders_are_refused_where_the_config_has_relative_paths(
        tmp_path):
    """One rank started elsewhere (mpiexec -wdir) named another store with the same relative
    output.path: the first rank wrote half the ensemble, the second then blamed "another
    run". Now one clean error before anything is written; absolute paths are taken."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    (tmp_path / "sub").mkdir()
    config = str(ROOT / "jobs" / "configs" / "grf.toml")

    def run(out: str):
        rank = [sys.executable, "-m", "pipeline.cli", "sample", config,
                *_sets([f"output.path={out}", "model.shape=[8, 8]", "sampler.steps=20",
                        "ensemble.members=2"])]
        return subprocess.run([MPIEXEC, "-n", "1", *rank, ":", "-n", "1", "-wdir",
                               str(tmp_path / "sub"), *rank], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=90)

    proc = run("x.zarr")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("piadm: error")]
    assert errors == [f"piadm: error: piadm sample: rank(s) 1 of 2 were started in another "
                      f"working folder ({tmp_path / 'sub'}) than rank 0 ({tmp_path}), where the "
                      "config's relative paths (output.path) name other files: start every rank "
                      "in one folder (mpiexec -wdir, srun --chdir), or give absolute paths"]
    assert not list(tmp_path.rglob("x.zarr"))
    assert run(str(tmp_path / "x.zarr")).returncode == 0
    # training reads its own paths: a relative train.data named another dataset on each rank
    rank = [sys.executable, "-m", "pipeline.cli", "train",
            str(ROOT / "jobs" / "configs" / "kolmogorov.toml"), "--set", "train.data=data.zarr"]
    proc = subprocess.run([MPIEXEC, "-n", "1", *rank, ":", "-n", "1", "-wdir",
                           str(tmp_path / "sub"), *rank], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 2 and ("where the config's relative paths (train.data, "
                                     "train.checkpoint) name other files") in proc.stderr


def test_a_bad_layout_is_one_clean_error_from_every_rank(tmp_path):
    proc = mpirun(2, ["-m", "pipeline.cli", "sample", "jobs/configs/grf.toml",
                      *_sets([f"output.path={tmp_path / 'x.zarr'}", "parallel.time_slices=3"])],
                  timeout=60)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("piadm: error")]
    assert len(errors) == 1 and "parallel.time_slices = 3 does not divide the 2 ranks" in errors[0]
    assert not (tmp_path / "x.zarr").exists()


def test_status_under_mpiexec_reads_once_and_says_an_error_once(tmp_path):
    proc = mpirun(2, ["-m", "pipeline.cli", "status", str(tmp_path / "none.zarr")], timeout=60)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("piadm: error")]
    assert proc.returncode == 2 and errors == [
        f"piadm: error: {tmp_path / 'none.zarr'} does not exist: pass the output.path of a run "
        "(a run that has not started has no store yet)"], proc.stderr


def test_an_existing_store_is_refused_by_every_rank_and_kept(tmp_path):
    path = tmp_path / "keep.zarr"
    path.mkdir()
    (path / "precious").write_text("data")
    proc = mpirun(2, ["-m", "pipeline.cli", "sample", "jobs/configs/grf.toml",
                      *_sets([f"output.path={path}", "parallel.time_slices=2"])], timeout=60)
    assert proc.returncode == 2 and "is not a piadm store" in proc.stderr
    assert (path / "precious").read_text() == "data"


@pytest.mark.slow
def test_one_and_four_ranks_write_identical_stores(tmp_path, input_store):
    from conftest import conditional_sets
    from test_ensemble import assert_same_store

    serial = tmp_path / "serial.zarr"
    days = "input.range=['2020-01-01', '2020-01-03']"  # 3 items x 3 batches over 1 and 4 ranks
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(input_store, serial, days)]) == 0
    for n in (4,):  # 4 groups of one rank each: 9 batches spread unevenly over ranks
        out = tmp_path / f"n{n}.zarr"
        proc = mpirun(n, ["-m", "pipeline.cli", "sample", "jobs/configs/grf.toml",
                          *conditional_sets(input_store, out, days)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert_same_store(serial, out)


@pytest.mark.slow
def test_sigterm_to_mpiexec_stops_every_rank_and_a_rerun_completes(tmp_path, input_store):
    from conftest import conditional_sets
    from test_preemption import MORE_WORK, members_done

    out, ref = tmp_path / "ens.zarr", tmp_path / "ref.zarr"
    sets = conditional_sets(input_store, out, *MORE_WORK, "parallel.time_slices=2")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "pipeline.cli", "sample",
                             "jobs/configs/grf.toml", *sets], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while members_done(out) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.terminate()  # Hydra forwards SIGTERM to every rank, as srun does
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err[-3000:]
    for rank in (0, 1):  # each rank says it was told, and which rank it is
        assert f"[rank {rank}/2] piadm: received SIGTERM" in err
    # The rerun may use another layout: here one rank finishes what two started.
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(input_store, out, *MORE_WORK)]) == 0
    assert main(["sample", "jobs/configs/grf.toml",
                 *conditional_sets(input_store, ref, *MORE_WORK)]) == 0
    got, want = xr.open_zarr(out), xr.open_zarr(ref)
    assert (got["done"] == want["done"]).all() and (got["seed"] == want["seed"]).all()
    # a member the two time slices finished before the signal may differ from the one-rank
    # run's by a flipped acceptance (an uninterrupted two-slice run of this case: one member
    # 2.4e-4 off on a field of 16.6, 3.2e-6 of the ensemble's norm)
    assert relative(got["vort"], want["vort"]) <= LAYOUT_BOUND["float32"]


def test_sigterm_while_rank_0_calibrates_for_all_exits_75_on_every_rank(tmp_path):
    """A stop during the start-up calibration (rank 0 measures for all) stopped rank 0 with
    exit 75 but aborted the others ("rank 0 failed: Stopped"), the job exiting 1: a SLURM
    script requeueing on 75 took a pre-emption for a failure."""
    out = tmp_path / "ens.zarr"
    sets = _sets(["model.shape=[8, 8]", "sampler.steps=40", "model.emulate_ms=[40, 0]",
                  'sampler.tol="auto"', "ensemble.members=2", f"output.path={out}"])
    env = dict(os.environ, PIADM_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "pipeline.cli", "sample",
                             "jobs/configs/grf.toml", *sets], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    lines = []
    for line in proc.stderr:  # the ladder's header: rank 0 is inside the calibration
        lines.append(line)
        if "calibrating pc-window" in line:
            break
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    err = "".join(lines) + err
    assert proc.returncode == 75, err[-3000:]
    assert "stopped by a signal before sampling began" in err and "failed" not in err
    assert "Abort" not in err and not out.exists()


def _bench_two_ranks(tmp_path, methods: str, *sets: str):
    """``piadm bench`` of ``methods`` on a 12x12 GRF on 2 ranks: (what it printed, its table
    on stdout and its notes on stderr, the rows of the parallel methods)."""
    import json

    out = tmp_path / "b.json"
    proc = mpirun(2, ["-m", "pipeline.cli", "bench", "jobs/configs/grf.toml", "--json", str(out),
                      *_sets(["bench.sizes=[[12, 12]]", "sampler.steps=120",
                              f"bench.methods={methods}", "bench.repeats=1", *sets])])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr, json.loads(out.read_text())["rows"][1:]


def test_bench_under_mpiexec_reports_each_kind_of_collective(tmp_path):
    err, (row,) = _bench_two_ranks(tmp_path, "['sequential-sde', 'pc-window']",
                                   "sampler.tol=1e-3", "parallel.time_slices=2")
    assert row["method"] == "pc-window" and row["ranks"] == 2
    # grf.toml's learned corrector: one Allgather (the rebuild's, both scans) and one
    # Allreduce a round (the changes', the secants with them), nothing else: the bench's own
    # reductions are not counted
    assert sorted(row["collectives"]) == ["Allgather", "Allreduce"]
    per_round = {"Allgather": 1, "Allreduce": 1}
    for name, (count, seconds, own) in row["collectives"].items():
        assert count == per_round[name] * row["rounds"] and 0 < own <= seconds
    # a collective's own time is the least any rank spent in it: part of the time in collectives
    own = sum(entry[2] for entry in row["collectives"].values())
    assert 0 < row["own_share"] <= row["comm_share"]
    # waiting for other ranks' model calls is part of the waiting, the rest of the time in
    # collectives (each share rounded to 1e-4)
    assert 0 <= row["model_wait_share"] <= row["comm_share"] - row["own_share"] + 2e-4
    # wall_s is rounded to the millisecond: allow for that on runs of a few milliseconds
    assert row["own_share"] == pytest.approx(own / row["wall_s"],
                                             rel=0.01 + 0.0006 / row["wall_s"])
    assert f"Allgather {row['rounds']} x" in err and "its own" in err
    assert "of the wall waiting for other ranks' model calls" in err


def test_bench_leaves_out_a_method_whose_rounds_have_fewer_points_than_ranks(tmp_path):
    """A window of one point on two ranks: one rank would call the model on no points (an
    FFT error and a traceback on every rank); the method is said and left out, the others
    run. A sequential sampler runs whole on every rank: its block of one step's noise draws
    leaves it no fewer points than ranks."""
    err, rows = _bench_two_ranks(tmp_path, "['sequential-sde', 'pc-window']",
                                 "sampler.tol=1e-3", "sampler.window=1", "sampler.block_size=1")
    assert rows == []  # the sequential reference alone
    assert "left out sequential-sde" not in err
    assert ("left out pc-window: its rounds have 1 point (sampler.window), fewer than the 2 "
            "ranks, each a time slice: launch at most 1 rank, or raise sampler.window") in err


def test_plan_under_mpiexec_times_the_collective_latency_among_its_ranks(tmp_path):
    """As an "auto" run does; on one process the plan takes the one-node figure."""
    import json

    from pipeline.planner import DEFAULT_LATENCY

    out = tmp_path / "plan.json"
    proc = mpirun(2, ["-m", "pipeline.cli", "plan", "jobs/configs/grf.toml", "--ranks", "4",
                      "--json", str(out), *_sets(["model.shape=[8, 8]", "sampler.steps=20",
                                                  "ensemble.members=1"])])
    assert proc.returncode == 0, proc.stderr[-3000:]
    latency = json.loads(out.read_text())["machine"]["latency"]
    assert latency > 0 and latency != DEFAULT_LATENCY
    # timed among 2 for a plan of 4: said, not silently taken as theirs
    assert ("the collectives' latency is timed among the 2 ranks of this launch, for a plan "
            "of 4") in proc.stderr


def test_a_replicated_window_costs_one_allgather_a_round_and_one_to_end(tmp_path):
    err, rows = _bench_two_ranks(tmp_path, "['sequential-sde', 'pc-window', 'pc-window-ode']",
                                 "sampler.tol=1e-4", "sampler.window_split=replicated")
    assert "2 ranks (time slices, pc-window's window split: replicated)" in err
    assert [row["method"] for row in rows] == ["pc-window", "pc-window-ode"]
    for row in rows:
        assert row["ranks"] == 2 and row["rounds"] > 3 and row["window_split"] == "replicated"
        assert list(row["collectives"]) == ["Allgather"]
        # and one of no points at the end: every rank ended its path with the others
        assert row["collectives"]["Allgather"][0] == row["rounds"] + 1


def test_a_brought_networks_warning_is_said_once_not_once_a_rank(tmp_path):
    """Every rank loads the same network: its lower-precision warning came once per rank."""
    sets = ["model.kind=module", "model.target=byo_nets:float16_out", "model.prediction=eps",
            "model.process=ddpm", "model.shape=[1, 8, 8]", "sampler.method=sequential-sde",
            "sampler.steps=10", "ensemble.members=2", "ensemble.batch_size=1",
            f"output.path={tmp_path / 'h.zarr'}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "pipeline.cli", "sample",
                           "jobs/configs/grf.toml", *_sets(sets)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("the network answers in torch.float16") == 1, proc.stderr[-2000:]

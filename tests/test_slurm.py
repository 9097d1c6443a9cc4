"""The SLURM batch scripts on a real SLURM (``bash jobs/slurm/local_slurm.sh`` starts a one-node
one): a 2-rank sampling job writes the store ``mpiexec -n 2`` writes; a job sent SIGUSR1
mid-run requeues itself and its rerun completes the store, nothing lost or duplicated; a job
array generates distinct data shards. Skipped where no SLURM answers."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "jobs" / "slurm"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
# 4 members per rank of about a second each (21 rounds of 40 ms): long enough to signal
# mid-run. The model's calls are padded by sleeping (model.emulate_ms), so the jobs take that
# wall time without taking the cores from the tests beside them; the members are the exact
# model's all the same. A fixed tol (what calibration picks here): each job calibrating anew
# would add seconds of CPU.
SAMPLE = ["model.shape=[16, 16]", "model.emulate_ms=[40, 0]", "sampler.steps=400",
          "sampler.block_size=50", "sampler.tol=1e-3", "ensemble.members=8",
          "ensemble.batch_size=1", "parallel.threads=1"]
DATA = ["data.snapshots=4", "data.resolution=32", "data.spinup=1.0", "data.chunk=2",
        "parallel.threads=1"]


def _cluster_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None when a node with 2 CPUs answers."""
    if shutil.which("sbatch") is None:
        return "no sbatch: `bash jobs/slurm/local_slurm.sh` starts a local SLURM (root, apt)"
    try:  # `scontrol ping` answers at once where sinfo retries for 9 s
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
        if ping.returncode != 0:
            return f"no SLURM controller answers ({ping.stdout.strip().splitlines()[0]})"
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T %c"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "no SLURM controller answers"
    nodes = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    usable = [int(cpus) for state, cpus in nodes
              if state.rstrip("*~#") in ("idle", "mixed", "allocated", "completing")]
    if proc.returncode != 0 or not usable:
        return f"no SLURM node is up ({proc.stderr.strip() or proc.stdout.strip() or 'none'})"
    if max(usable) < 2:
        return "the SLURM node has fewer than 2 CPUs"
    return None


pytest.importorskip("mpi4py")
_PROBLEM = _cluster_problem()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM)),
              pytest.mark.timeout(150), pytest.mark.slow]  # 35 s a job on a local SLURM

from pipeline.cli import main  # noqa: E402
from test_mpi import mpirun  # noqa: E402
from test_preemption import members_done  # noqa: E402


def _sets(items):
    return sum((["--set", s] for s in items), [])


def job_env() -> dict:
    """The submitter's environment, which sbatch passes on: this Python's venv on PATH (its
    mpiexec and, when installed, piadm), else PIADM naming this Python."""
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=os.pathsep.join([str(bindir), os.environ.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if not (bindir / "piadm").exists():
        env["PIADM"] = f"{sys.executable} -m pipeline.cli"
    return env


def sbatch(script: str, *args: str, log: Path, options=(), cwd: Path = ROOT) -> str:
    """Submit a script of jobs/slurm (no GPUs here) from ``cwd``, the repository root unless
    given; the job id."""
    proc = subprocess.run(["sbatch", "--parsable", "--gpus-per-task=0", "-o", str(log),
                           *options, str(SLURM / script), *args], cwd=cwd, env=job_env(),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_records(job: str) -> list[dict]:
    """`scontrol show job` as one dict per job (per array task)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True,
                         timeout=10).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def wait_job(job: str, logs, timeout: float = 120) -> list[dict]:
    """Poll until every record of the job is in a final state; cancel it on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = job_records(job)
        if records and all(r.get("JobState") in FINAL for r in records):
            return records
        time.sleep(0.5)
    subprocess.run(["scancel", "--full", job], timeout=10)
    text = "\n".join(Path(p).read_text() for p in logs if Path(p).exists())
    pytest.fail(f"job {job} did not finish within {timeout} s: {job_records(job)}\n{text}")


def _done(records) -> bool:
    return all(r["JobState"] == "COMPLETED" and r["ExitCode"] == "0:0" for r in records)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same ensemble sampled by `mpiexec -n 2` outside SLURM."""
    path = tmp_path_factory.mktemp("slurm_ref") / "ref.zarr"
    proc = mpirun(2, ["-m", "pipeline.cli", "sample", "jobs/configs/grf.toml",
                      *_sets(SAMPLE + [f"output.path={path}"])], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path


def test_a_two_rank_job_writes_the_store_mpiexec_writes(tmp_path, request):
    out, log = tmp_path / "job.zarr", tmp_path / "job.log"
    job = sbatch("sample.sbatch", "jobs/configs/grf.toml", *_sets(SAMPLE + [f"output.path={out}"]),
                 log=log, options=["-n", "2"])
    ref = request.getfixturevalue("reference")  # sampled while the job runs
    records = wait_job(job, [log])
    text = log.read_text()
    assert _done(records), text
    assert "2 ranks = 2 groups x 1 time slice," in text
    a, b = xr.open_zarr(ref), xr.open_zarr(out)
    assert b.done.values.all()
    xr.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # every variable, done included


@pytest.mark.parametrize("signal, to", [("USR1", "--batch"), ("TERM", "--full")])
def test_a_stop_signal_mid_run_requeues_the_job_and_its_rerun_completes_the_store(
        tmp_path, reference, capsys, signal, to):
    """SIGUSR1 to the batch script (the --signal before the time limit), or SIGTERM to every
    process of the job (what SLURM sends at the limit and at a preemption with a grace
    time: untrapped, it ended the script at once and the ranks were killed mid-batch)."""
    out, log = tmp_path / "job.zarr", tmp_path / "job.log"
    job = sbatch("sample.sbatch", "jobs/configs/grf.toml", *_sets(SAMPLE + [f"output.path={out}"]),
                 log=log, options=["-n", "2"])
    for tick in range(900):  # up to 90 s for the first member, asking SLURM once a second
        if members_done(out) >= 1:
            break
        if tick % 10 == 9:
            assert not all(r.get("JobState") in FINAL for r in job_records(job)), log.read_text()
        time.sleep(0.1)
    else:
        pytest.fail(f"no member done after 90 s: {log.read_text() if log.exists() else 'no log'}")
    subprocess.run(["scancel", f"--signal={signal}", to, job], check=True, timeout=10)
    records = wait_job(job, [log])
    text = log.read_text()
    assert _done(records) and records[0]["Restarts"] == "1", text
    assert f"SIG{signal} received" in text and "requeueing" in text
    if signal == "USR1":  # (the local SLURM's scancel --full cancels the step too: its
        # ranks may be killed before they say anything, the batch in flight lost and
        # sampled again by the rerun)
        assert "received SIGUSR1" in text
        _each_member_once(text)
    xr.testing.assert_equal(xr.open_zarr(reference), xr.open_zarr(out))  # bit for bit
    assert main(["status", str(out)]) == 0
    assert "8/8 members done" in capsys.readouterr().out


def test_a_users_scancel_ends_the_job_without_a_requeue(tmp_path):
    """The script took every SIGTERM for a time limit or a preemption and requeued the job:
    a user's `scancel JOBID` (and --full, or KILL) restarted it, so no scancel could end it."""
    out, log = tmp_path / "job.zarr", tmp_path / "job.log"
    job = sbatch("sample.sbatch", "jobs/configs/grf.toml", *_sets(SAMPLE + [f"output.path={out}"]),
                 log=log, options=["-n", "1"])
    for _ in range(900):  # up to 90 s for the first member
        if members_done(out) >= 1:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"no member done after 90 s: {log.read_text() if log.exists() else 'no log'}")
    subprocess.run(["scancel", job], check=True, timeout=10)
    records = wait_job(job, [log])
    text = log.read_text()
    assert records[0]["JobState"] == "CANCELLED" and records[0]["Restarts"] == "0", text
    assert "not requeued by this script" in text and "requeueing" not in text


def _each_member_once(text: str) -> None:
    """The first run stopped after writing some members, the rerun wrote the rest."""
    first, rerun = re.findall(r"(?:stopped|done): (\d+) members written[^(\n]*\((\d+) were already",
                              text)
    assert first[1] == "0" and rerun[1] == first[0] and 1 <= int(first[0]) < 8, text
    assert int(first[0]) + int(rerun[0]) == 8, text  # each member sampled once


def test_an_array_job_generates_distinct_data_shards(tmp_path):
    """Submitted from outside the repository: the task that carries the array's own job id
    (for which scontrol shows every task) finds the repository as the others do."""
    shards = tmp_path / "shards"
    job = sbatch("generate.sbatch", str(ROOT / "jobs/configs/kolmogorov.toml"), str(shards),
                 *_sets(DATA), log=tmp_path / "gen-%a.log", options=["--array=0-1"],
                 cwd=tmp_path)
    logs = [tmp_path / f"gen-{i}.log" for i in range(2)]
    records = wait_job(job, logs)
    assert len(records) == 2 and _done(records), "\n".join(p.read_text() for p in logs)
    paths = sorted(shards.glob("shard-*.zarr"))
    assert [p.name for p in paths] == ["shard-000.zarr", "shard-001.zarr"]
    # Opened together as jobs/slurm/generate.sbatch says.
    ds = xr.open_mfdataset(paths, engine="zarr", combine="nested", concat_dim="shard")
    w = ds.vorticity.values
    assert w.shape == (2, 4, 32, 32) and np.isfinite(w).all() and w.std() > 0
    assert not np.allclose(w[0], w[1])  # distinct seeds, distinct trajectories
    assert ds.vorticity_coarse.shape == (2, 4, 8, 8)


def test_a_requeued_array_task_makes_its_shard_anew_and_keeps_both_logs(tmp_path):
    """generate-data does not resume: a task SLURM requeued (a preemption, a node failure)
    was refused its own half-made shard, and its first run's log was overwritten."""
    shards, log = tmp_path / "shards", tmp_path / "gen-%a.log"
    slow = ["data.snapshots=120", "data.resolution=32", "data.spinup=2.0", "data.chunk=10",
            "parallel.threads=1"]
    job = sbatch("generate.sbatch", str(ROOT / "jobs/configs/kolmogorov.toml"), str(shards),
                 *_sets(slow), log=log, options=["--array=0"], cwd=tmp_path)
    logs = [tmp_path / "gen-0.log"]
    for _ in range(600):  # up to 60 s for the shard's store to appear
        if (shards / "shard-000.zarr" / "zarr.json").exists():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"no shard after 60 s: {logs[0].read_text() if logs[0].exists() else ''}")
    subprocess.run(["scontrol", "requeue", f"{job}_0"], check=True, timeout=10)
    records = wait_job(job, logs, timeout=240)
    text = logs[0].read_text()
    assert _done(records) and records[0]["Restarts"] == "1", text
    assert "restart 0:" in text and "restart 1:" in text and "data.overwrite=true" in text
    w = xr.open_zarr(shards / "shard-000.zarr").vorticity.values
    assert w.shape == (120, 32, 32) and np.isfinite(w).all()


def test_usr1_to_one_array_task_requeues_that_task_alone(tmp_path, reference):
    """Two array tasks of one rank fill one store; the one that carries the array's own job
    id is signalled. `scontrol requeue` of that id requeued (and killed) every task: only
    the signalled one restarts, and the store is the one mpiexec makes."""
    out = tmp_path / "job.zarr"
    job = sbatch("sample.sbatch", str(ROOT / "jobs/configs/grf.toml"),
                 *_sets(SAMPLE + [f"output.path={out}"]), log=tmp_path / "task-%a.log",
                 options=["--array=0-1", "-n", "1"], cwd=tmp_path)
    logs = [tmp_path / f"task-{i}.log" for i in range(2)]
    for _ in range(900):  # up to 90 s for the first member
        if members_done(out) >= 1:
            break
        time.sleep(0.1)
    else:
        pytest.fail("no member done after 90 s: " + " ".join(
            p.read_text() for p in logs if p.exists()))
    task = next(r["ArrayTaskId"] for r in job_records(job) if r["JobId"] == job)
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job}_{task}"], check=True,
                   timeout=10)
    records = wait_job(job, logs)
    text = "\n".join(p.read_text() for p in logs)
    assert len(records) == 2 and _done(records), text
    restarts = {r["ArrayTaskId"]: r["Restarts"] for r in records}
    assert restarts == {task: "1", str(1 - int(task)): "0"}, text
    other = tmp_path / f"task-{1 - int(task)}.log"  # the signalled task's own may say it
    assert "DUE TO JOB REQUEUE" not in other.read_text()
    xr.testing.assert_allclose(xr.open_zarr(reference), xr.open_zarr(out), rtol=1e-6, atol=1e-6)

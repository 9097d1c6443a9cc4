"""The batch scripts find the repository from the path they were submitted by, however it
was spelled, without a SLURM: a stand-in ``scontrol`` says what SLURM says of the job, and
each script runs from a copy elsewhere, as SLURM runs it."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# SLURM's own goes on writing lines after Command= (the pause makes a reader that stops
# there meet it every time: the write into its closed pipe failed the script now and then)
SCONTROL = """#!/usr/bin/env bash
echo "JobId=$SLURM_JOB_ID JobName=piadm"
echo "   Command=$SUBMITTED"
sleep 0.2
echo "   WorkDir=$SLURM_SUBMIT_DIR"
"""


def _run_copy(tmp_path, script: str, submitted: str, submit_dir: Path, **env_changes):
    bin_dir, spool = tmp_path / "bin", tmp_path / "spool"
    bin_dir.mkdir(exist_ok=True)
    spool.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    copy = spool / "slurm_script"
    shutil.copy(ROOT / "jobs" / "slurm" / script, copy)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SUBMITTED": submitted,
           "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(submit_dir), "PIADM": "echo piadm"}
    env.pop("PIADM_ROOT", None)
    env.pop("SLURM_ARRAY_TASK_ID", None)
    env.update(env_changes)
    env = {key: value for key, value in env.items() if value is not None}
    return subprocess.run(["bash", str(copy), "config.toml", str(tmp_path / "shards")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("submitted, submit_dir", [
    ("../jobs/slurm/generate.sbatch config.toml shards", ROOT / "docs"),
    ("./generate.sbatch config.toml shards", ROOT / "jobs" / "slurm"),
    (f"{ROOT}/jobs/slurm/generate.sbatch config.toml shards", Path("/")),
])
def test_a_script_submitted_by_a_relative_path_finds_the_repository(tmp_path, submitted,
                                                                     submit_dir):
    """Past finding the repository, the script stops at its own first check (no --array),
    a usage error (exit 2) in one line."""
    run = _run_copy(tmp_path, "generate.sbatch", submitted, submit_dir)
    assert run.returncode == 2 and run.stderr.strip() == (
        "piadm: generate.sbatch makes one shard per array task: submit it with --array, e.g. "
        "sbatch --array=0-7 jobs/slurm/generate.sbatch CONFIG FOLDER"), run.stderr


def test_where_no_repository_is_found_the_script_says_to_set_piadm_root(tmp_path):
    run = _run_copy(tmp_path, "sample.sbatch", "../elsewhere/sample.sbatch c", tmp_path)
    assert run.returncode == 2
    assert f"piadm: no jobs/common.sh in {tmp_path}: set PIADM_ROOT" in run.stderr


@pytest.mark.parametrize("script", ["sample.sbatch", "train.sbatch", "generate.sbatch"])
def test_a_script_run_by_bash_says_to_submit_it_with_sbatch(tmp_path, script):
    """Run by bash, the scripts stopped at their first use of SLURM_JOB_ID: "unbound
    variable", exit 1."""
    run = _run_copy(tmp_path, script, f"{ROOT}/jobs/slurm/{script} c", tmp_path,
                    SLURM_JOB_ID=None)
    assert run.returncode == 2 and run.stderr.strip() == (
        "piadm: slurm_script is a SLURM batch script: submit it with sbatch (its header shows "
        "how), or run piadm itself outside SLURM"), run.stderr


def test_a_piadm_that_names_no_command_is_refused_before_the_ranks_start(tmp_path):
    """srun said "execve(): /nonexistent/piadm: No such file or directory" once a rank,
    naming neither PIADM nor the fix; nor is the shard's folder made before piadm runs."""
    run = _run_copy(tmp_path, "sample.sbatch", f"{ROOT}/jobs/slurm/sample.sbatch c", tmp_path,
                    PIADM="/nonexistent/piadm --flag")
    assert run.returncode == 2 and run.stderr.strip().startswith(
        "piadm: PIADM = '/nonexistent/piadm --flag' names no command found here: fix it"), (
        run.stderr)
    run = _run_copy(tmp_path, "generate.sbatch", f"{ROOT}/jobs/slurm/generate.sbatch c s",
                    tmp_path, SLURM_ARRAY_TASK_ID="3")
    assert run.returncode == 0 and "data.path=\"" in run.stdout  # PIADM is echo here
    assert not (tmp_path / "shards").exists()  # piadm makes data.path's folders itself


@pytest.mark.parametrize("shown, cancelled", [
    ("JobId=7 JobName=piadm JobState=COMPLETING Reason=None Dependency=(null)", True),
    ("JobId=7 JobState=CANCELLED Reason=None", True),
    ("JobId=7 JobState=COMPLETING Reason=TimeLimit", False),  # a time limit: requeued
    # a preemption's kill reads as a cancel but for its time (PreemptMode=CANCEL sets none)
    ("JobId=7 JobState=COMPLETING Reason=None\n   PreemptTime=2026-12-06T10:00:00", False),
    ("JobId=7 JobState=RUNNING Reason=None\n   PreemptTime=None", False),  # a TERM sent by hand
    ("", False)])  # scontrol failed: requeued, as before a cancel was told apart
def test_a_users_scancel_is_told_from_a_time_limit_or_a_preemption(shown, cancelled):
    """sample.sbatch took every SIGTERM for a time limit and requeued a scancelled job; told
    apart by the job's state alone, a preemption's kill would read as a cancel and lose its
    requeue."""
    proc = subprocess.run(["bash", "-c", 'source jobs/common.sh; printf "%s\\n" "$1" | '
                           'cancelled_by_user', "-", shown], cwd=ROOT, timeout=30)
    assert (proc.returncode == 0) == cancelled

# Sourced by the job scripts (jobs/local/*.sh, jobs/slurm/*.sbatch): how to run piadm, waiting
# on a run that a signal may interrupt, and the overrides that make one data shard.
#
# After sourcing, the array `piadm` is the command to run, found in this order:
#   1. $PIADM, split on spaces, e.g. PIADM="python -m pipeline.cli" (with PYTHONPATH set);
#   2. `piadm` on PATH (an activated venv; sbatch passes the submitter's environment on);
#   3. the project's own venv: jobs/local/setup.sh creates or refreshes .venv and puts it on PATH
#      (with the venv's mpiexec).

piadm_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${PIADM:-}" ]; then
    read -r -a piadm <<<"$PIADM"
    if ! command -v "${piadm[0]:-}" >/dev/null; then  # else srun's execve error, once a rank
        echo "piadm: PIADM = '$PIADM' names no command found here: fix it (e.g." \
             "PIADM=\"python -m pipeline.cli\" with PYTHONPATH set) or unset it" >&2
        exit 2
    fi
elif command -v piadm >/dev/null; then
    piadm=(piadm)
else
    # Array tasks starting together on a fresh clone: one installs, the others wait for it.
    piadm_venv="${PIADM_VENV:-$piadm_root/.venv}"
    if command -v flock >/dev/null && mkdir -p "$piadm_venv"; then
        flock "$piadm_venv/.setup.lock" bash "$piadm_root/jobs/local/setup.sh"
    fi
    # shellcheck source=jobs/local/setup.sh
    source "$piadm_root/jobs/local/setup.sh"
    piadm=(piadm)
fi

# Status of background job $1, waiting again whenever a trapped signal interrupts `wait`
# (bash runs a trap only between commands, so a run that must see signals runs in the
# background and the script waits for it).
wait_through_signals() {
    local rc
    while :; do
        rc=0
        wait "$1" || rc=$?
        if [ "$rc" -gt 128 ] && kill -0 "$1" 2>/dev/null; then
            continue  # interrupted by a trap; the run goes on
        fi
        return "$rc"
    done
}

# Whether `scontrol show job` output on stdin shows a job a user cancelled (scancel): CANCELLED,
# or COMPLETING with no reason (a time limit says TimeLimit), and no PreemptTime (a
# preemption's kill reads alike, but SLURM stamps its time). Status 0 for a cancel.
cancelled_by_user() {
    local shown
    shown="$(cat)"
    case "$(grep -o 'JobState=[A-Z_]* Reason=[^ ]*' <<<"$shown" | head -n 1)" in
        JobState=CANCELLED*|"JobState=COMPLETING Reason=None")
            ! grep -q 'PreemptTime=[0-9]' <<<"$shown" ;;
        *) return 1 ;;
    esac
}

# Overrides for data shard $1 of a set in folder $2: its own store and its own seed (= $1), so
# shards are independent trajectories. Prints one override per line. The path is a quoted TOML
# string: bare, a folder named "shards #1" was cut at its " #" and "[v2] shards" read as a list.
shard_sets() {
    local folder=${2//\\/\\\\}
    folder=${folder//\"/\\\"}
    printf -- '--set\ndata.path="%s/shard-%03d.zarr"\n--set\ndata.seed=%d\n' "$folder" "$1" "$1"
}

# The pip MPICH names its shared-memory segments after the PMI job id, which srun sets to
# JOBID.STEPID (/dev/shm/mpich_shm_<FNV-1a hash>_<node>). A requeued job reuses those ids, so a
# segment that a killed step left behind (a requeue or preemption while ranks ran, a time
# limit) would make the rerun's MPI_Init fail on one rank and hang on the others. On a restart,
# remove this job's segments for steps 0 and 1 on every node (the removal is itself step 0,
# so the MPI step of a rerun is step 1). Other MPIs ignore these names.
clear_stale_mpich_segments() {
    [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] || return 0
    local step id i c h patterns=""
    for step in 0 1; do
        id="$SLURM_JOB_ID.$step"
        h=2166136261
        for ((i = 0; i < ${#id}; i++)); do
            printf -v c '%d' "'${id:i:1}"
            h=$(( ((h ^ c) * 16777619) & 0xFFFFFFFF ))
        done
        printf -v h '%x' "$h"
        patterns+=" /dev/shm/mpich_shm_${h}_* /dev/shm/mpich_vci_${h}_*"
    done
    srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
        --mpi=none bash -c "rm -f$patterns" || true
}

# is_count and positive_count: the checks of a count a job script is given
# shellcheck source=jobs/counts.sh
source "$piadm_root/jobs/counts.sh"

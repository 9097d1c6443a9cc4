#!/usr/bin/env bash
# Sample an ensemble on this workstation with the venv's mpiexec: the local twin of
# jobs/slurm/sample.sbatch.
#
#   PIADM_RANKS=4 bash jobs/local/sample.sh jobs/configs/grf.toml --set parallel.time_slices=2
#
# Arguments: a config file, then any `--set key=value` overrides. PIADM_RANKS sets the rank count
# (default 2). `kill -TERM` to mpiexec (which passes it to every rank) stops the run after the
# current batch with exit 75; running the same command again resumes the store.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: [PIADM_RANKS=N] bash jobs/local/sample.sh CONFIG [--set KEY=VALUE ...]" >&2
    exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
ranks=$(positive_count PIADM_RANKS 2) || exit 2
command -v mpiexec >/dev/null || source "$piadm_root/jobs/local/setup.sh"
rc=0
mpiexec -n "$ranks" "${piadm[@]}" sample "$@" || rc=$?
if [ "$rc" -eq 75 ]; then
    echo "stopped early: run the same command again to resume" >&2
fi
exit "$rc"

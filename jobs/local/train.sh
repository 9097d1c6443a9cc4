#!/usr/bin/env bash
# Train a U-Net score model on this workstation, data-parallel over local MPI ranks: the local
# twin of jobs/slurm/train.sbatch.
#
#   PIADM_RANKS=2 bash jobs/local/train.sh jobs/configs/kolmogorov.toml --set train.steps=500
#
# Arguments: a config file (its [train] section, or train.* defaults: kolmogorov.toml has none
# and trains on out/kolmogorov.zarr into out/unet.pt), then any `--set key=value` overrides.
# PIADM_RANKS sets the rank count (default 2). Rerunning resumes from the last checkpoint.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: [PIADM_RANKS=N] bash jobs/local/train.sh CONFIG [--set KEY=VALUE ...]" >&2
    exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
ranks=$(positive_count PIADM_RANKS 2) || exit 2
command -v mpiexec >/dev/null || source "$piadm_root/jobs/local/setup.sh"
exec mpiexec -n "$ranks" "${piadm[@]}" train "$@"

#!/usr/bin/env bash
# Generate Kolmogorov-flow data shards on this workstation, one after another: the local twin
# of the job array jobs/slurm/generate.sbatch (shard i: FOLDER/shard-00i.zarr, data.seed = i).
#
#   PIADM_SHARDS=4 bash jobs/local/generate.sh jobs/configs/kolmogorov.toml out/kolmogorov_shards
#
# Arguments: a config file with a [data] section, the folder for the shards, then any
# `--set key=value` overrides. PIADM_SHARDS sets the number of shards (default 2). How to open
# the shards together: see jobs/slurm/generate.sbatch.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: [PIADM_SHARDS=N] bash jobs/local/generate.sh CONFIG SHARD_FOLDER" \
         "[--set KEY=VALUE ...]" >&2
    exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
config="$1" folder="$2"
shift 2
shards=$(positive_count PIADM_SHARDS 2) || exit 2
mkdir -p "$folder"
for ((task = 0; task < shards; task++)); do
    mapfile -t shard < <(shard_sets "$task" "$folder")
    "${piadm[@]}" generate-data "$config" "$@" "${shard[@]}"
done

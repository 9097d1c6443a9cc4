#!/usr/bin/env bash
# The main job end to end on this machine (jobs/configs/demo.toml):
#   1. simulate fresh Kolmogorov flow the shipped models never saw   -> out/demo_truth.zarr
#   2. sample 6 fine fields per coarse snapshot with the shipped 4x downscaling U-Net, the
#      parallel window split over PIADM_RANKS (default 2) local MPI ranks -> out/demo.zarr
#   3. score the ensemble against the truth, print the table, draw the figures -> out/demo_eval/
# Extra arguments are --set overrides for the sampling step.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source jobs/counts.sh
ranks=$(positive_count PIADM_RANKS 2) || exit 2  # before the set-up: a typo costs nothing
source jobs/local/setup.sh
config=jobs/configs/demo.toml
piadm generate-data "$config" --set data.overwrite=true
# sampled afresh every time (on other PIADM_RANKS too): a complete store would be resumed,
# with nothing left to sample and no figures of its own to show
rm -rf out/demo.zarr
mpiexec -n "$ranks" piadm sample "$config" --set output.overwrite=true \
    --set parallel.time_slices="$ranks" "$@"
piadm evaluate out/demo.zarr --truth out/demo_truth.zarr --out out/demo_eval
echo "figures: $(ls out/demo_eval/*.png | tr '\n' ' ')"

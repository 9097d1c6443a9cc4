#!/usr/bin/env bash
# The main job end to end on this machine: set up, sample an ensemble of the shipped exact GRF
# model with block-parallel Picard on 2 local MPI ranks (each block split into 2 time slices)
# into a local Zarr store, and print what it holds. PIADM_RANKS changes the rank count.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source jobs/local/setup.sh
ranks="${PIADM_RANKS:-2}"
mpiexec -n "$ranks" piadm sample jobs/configs/grf.toml --set output.overwrite=true \
    --set parallel.time_slices="$ranks" "$@"
python -c "
import xarray as xr
ds = xr.open_zarr('out/grf.zarr')
print(ds)
print('per-member std:', ds.field.std(('y', 'x')).values.round(3))
"

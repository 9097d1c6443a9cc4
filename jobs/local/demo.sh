#!/usr/bin/env bash
# The main job end to end on this machine: set up, sample an ensemble of the shipped exact GRF
# model with block-parallel Picard into a local Zarr store, and print what it holds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source jobs/local/setup.sh
piadm sample jobs/configs/grf.toml --set output.overwrite=true "$@"
python -c "
import xarray as xr
ds = xr.open_zarr('out/grf.zarr')
print(ds)
print('per-member std:', ds.field.std(('y', 'x')).values.round(3))
"

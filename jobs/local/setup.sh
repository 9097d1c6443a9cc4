#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (idempotent, CPU torch pinned).
# Sourced by demo.sh and test.sh; PIADM_VENV overrides the location.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${PIADM_VENV:-$root/.venv}"
stamp="$venv/.piadm-setup"
want="$(sha256sum "$root/pyproject.toml" "$root/jobs/local/setup.sh" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setting up $venv (first run takes a few minutes)" >&2
    t0=$SECONDS
    echo "  [1/4] creating the virtual environment" >&2
    python3 -m venv "$venv"
    echo "  [2/4] upgrading pip" >&2
    "$venv/bin/python" -m pip install -q --upgrade pip
    # torch is pinned here, not in pyproject: an unpinned torch pulls a multi-GB CUDA build.
    echo "  [3/4] installing torch 2.13.0 (the longest step)" >&2
    "$venv/bin/python" -m pip install -q "torch==2.13.0"
    echo "  [4/4] installing piadm with MPI (mpi4py, mpich), test and bench extras" >&2
    "$venv/bin/python" -m pip install -q -e "$root[mpi,dev,bench]"
    echo "$want" > "$stamp"
    echo "  $venv is ready ($((SECONDS - t0)) s)" >&2
fi
export PATH="$venv/bin:$PATH"

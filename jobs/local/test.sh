#!/usr/bin/env bash
# Set up and run the whole test suite (CPU only; MPI tests launch mpiexec themselves) on two
# pytest-xdist workers, a test file to a worker (so a module's fixtures are built once): most
# tests wait on subprocesses, sleeps or MPI, so two share 2 cores well. Files are dealt out in
# the order tests/conftest.py gives them, the longest first (--no-loadscope-reorder: not by
# their number of tests), so both workers finish together. Arguments pass through to pytest
# (-n 0: one process).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source jobs/local/setup.sh
python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 "$@"

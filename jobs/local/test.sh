#!/usr/bin/env bash
# Set up and run the whole test suite (CPU only; MPI tests launch mpiexec themselves).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source jobs/local/setup.sh
python -m pytest -q --durations=15 "$@"

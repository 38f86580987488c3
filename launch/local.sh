#!/usr/bin/env bash
# Run dpvit training on this machine with N ranks (default: one per core).
#
#   launch/local.sh                 # one rank per core, default MNIST recipe
#   NP=4 launch/local.sh --epochs 1 --run-dir runs/try
#
# Each rank uses one thread when several share the host; dpvit decides this itself
# (dpvit.parallel.threads.configure_threads), so nothing needs exporting here. Extra
# arguments go to `python -m dpvit.train`. PYTHON names the interpreter (default: python on
# PATH); the mpirun beside it is used, else the one on PATH.
set -euo pipefail
np="${NP:-$(nproc)}"
python="${PYTHON:-python}"
mpirun="$(dirname "$(command -v "$python")")/mpirun"
[ -x "$mpirun" ] || mpirun="mpirun"
exec "$mpirun" -n "$np" "$python" -m dpvit.train "$@"

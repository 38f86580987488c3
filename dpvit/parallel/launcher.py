"""What the MPI launcher tells a process before MPI is initialised, and where mpirun is."""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: Environment variables set by MPI launchers (MPICH/Hydra, Intel MPI, Open MPI, PMIx, PALS,
#: srun with PMI); any of them means "started by a launcher, initialise MPI".
LAUNCHER_ENV_VARS = (
    "PMI_RANK",
    "PMI_SIZE",
    "PMIX_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "MPI_LOCALNRANKS",
    "PALS_RANKID",
)

def launched_by_mpi(environ: dict[str, str] | None = None) -> bool:
    """Whether an MPI launcher (mpirun, mpiexec, srun with PMI) started this process."""
    env = os.environ if environ is None else environ
    return any(name in env for name in LAUNCHER_ENV_VARS)



def launcher_rank(environ: dict[str, str] | None = None) -> int:
    """This process's rank as the launcher numbered it (0 without a launcher), read from the
    environment so that it is known without initialising MPI."""
    env = os.environ if environ is None else environ
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PALS_RANKID", "SLURM_PROCID"):
        if env.get(name, "").isdigit():
            return int(env[name])
    return 0



def find_mpirun() -> str:
    """The mpirun of this Python environment (the mpich wheel puts it beside python), else
    whatever ``mpirun`` the PATH gives."""
    beside = Path(sys.executable).parent / "mpirun"
    return str(beside) if beside.exists() else "mpirun"



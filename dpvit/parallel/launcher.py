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


#: What ``/proc/<pid>/stat`` names Hydra's proxy and its launcher (15 characters at most).
_PROXY = "hydra_pmi_proxy"
_LAUNCHERS = ("mpirun", "mpiexec", "mpiexec.hydra")


def _parent_and_name(pid: int, proc: Path) -> tuple[int, str]:
    text = (proc / str(pid) / "stat").read_text()
    name = text[text.index("(") + 1 : text.rindex(")")]
    return int(text[text.rindex(")") + 2 :].split()[1]), name


def local_mpirun_pid(proc: Path = Path("/proc")) -> int | None:
    """The pid of Hydra's ``mpirun`` when this process is a rank started by Hydra's proxy and
    that ``mpirun`` runs on this machine (rank -> ``hydra_pmi_proxy`` -> ``mpirun``, with at
    most a few launcher shells between the proxy and ``mpirun``); None otherwise (no
    launcher, another launcher, a rank on another machine, or no /proc)."""
    try:
        pid, name = _parent_and_name(os.getpid(), proc)
        _, proxy_name = _parent_and_name(pid, proc)
        if proxy_name != _PROXY:
            return None
        for _ in range(4):  # the proxy, then the shells a launcher such as ssh may add
            pid, _ = _parent_and_name(pid, proc)
            if pid <= 1:
                return None
            _, name = _parent_and_name(pid, proc)
            if name in _LAUNCHERS:
                return pid
    except (OSError, ValueError, IndexError):  # not Linux, another user's mpirun, a race
        return None
    return None

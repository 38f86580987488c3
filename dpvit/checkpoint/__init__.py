"""HDF5 training checkpoints: atomic save, verified load, rolling retention and resume lookup.

``format`` writes and reads one checkpoint file, ``seal`` is its whole-file header, and
``rolling`` keeps a run's step-N.h5, last.h5 and best.h5 and finds the one to resume from.
"""

from dpvit.checkpoint.format import (
    FORMAT_VERSION,
    Checkpoint,
    load_checkpoint,
    read_checkpoint_step,
    restore_arrays,
    save_checkpoint,
)
from dpvit.checkpoint.rolling import (
    find_resume_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    save_rolling,
)
from dpvit.checkpoint.seal import CheckpointError

__all__ = ["FORMAT_VERSION", "Checkpoint", "CheckpointError", "find_resume_checkpoint",
           "list_checkpoints", "load_checkpoint", "prune_checkpoints", "read_checkpoint_step",
           "restore_arrays", "save_checkpoint", "save_rolling"]

"""Dataset pipeline: idx files -> verified HDF5 store -> rank-sharded, augmented batches.

Typical use on every rank::

    path = prepare_dataset("mnist", data_dir, comm)      # rank 0 builds, others wait
    images, labels = load_split(path, "train")
    steps = train_batches(len(labels), global_batch, seed, epoch, comm.rank, comm.size)
    for x, y in BatchIterator(images, labels, steps, info.mean, info.std, augment=Augmentation()):
        ...
"""

from dpvit.data.augment import Augmentation, augment, normalize
from dpvit.data.idx import DATASETS, DataError, DatasetInfo
from dpvit.data.loader import BatchIterator
from dpvit.data.sampler import eval_shard, train_batches
from dpvit.data.store import load_split, prepare_dataset, resolve_data_dir, split_size

__all__ = [
    "DATASETS",
    "Augmentation",
    "BatchIterator",
    "DataError",
    "DatasetInfo",
    "augment",
    "eval_shard",
    "load_split",
    "normalize",
    "prepare_dataset",
    "resolve_data_dir",
    "split_size",
    "train_batches",
]

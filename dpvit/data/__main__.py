"""Command line: ``python -m dpvit.data {fetch,verify,info} DATASET [--data-dir DIR]``.

``fetch`` finds or downloads the idx files, verifies them and builds the HDF5 store, and
prints the store's path; ``verify`` re-reads and re-checks the idx files without downloading;
``info`` describes the dataset and where its files and store are. Errors are one line on
stderr and exit status 1 (offline: at once, naming the missing files and where to put them).
"""

from __future__ import annotations

import argparse
import logging
import sys

from dpvit.data.download import mirror_env_var, mirrors_for
from dpvit.data.idx import DATASETS, SPLITS, DataError, get_info, read_split
from dpvit.data.store import (
    find_store,
    locate_idx_files,
    prepare_dataset,
    resolve_data_dir,
    store_dir_for,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dpvit.data", description=__doc__)
    parser.add_argument("command", choices=("fetch", "verify", "info"))
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--data-dir", default=None,
                        help="directory with the idx files (default: $DPVIT_DATA_DIR or "
                             "data/<dataset>)")
    parser.add_argument("--store-dir", default=None,
                        help="where to write the HDF5 store (default: data/<dataset> when that "
                             "is the data directory, else $DPVIT_CACHE_DIR or ~/.cache/dpvit)")
    parser.add_argument("--offline", action="store_true",
                        help="fetch: never download, only use files already on disk")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    info = get_info(args.dataset)
    try:
        if args.command == "fetch":
            print(prepare_dataset(args.dataset, args.data_dir, download=not args.offline,
                                  store_dir=args.store_dir))
        elif args.command == "verify":
            files = locate_idx_files(info, resolve_data_dir(args.dataset, args.data_dir),
                                     download=False)
            for split in SPLITS:
                images_name, labels_name = info.files[split]
                images, _, _ = read_split(info, split, files[images_name], files[labels_name])
                print(f"{split}: {len(images)} images OK "
                      f"({files[images_name]}, {files[labels_name]})")
        else:
            store = find_store(args.dataset, args.data_dir, args.store_dir)
            data_dir = resolve_data_dir(args.dataset, args.data_dir)
            home = store_dir_for(args.dataset, data_dir, args.store_dir)
            print(f"dataset:   {info.name} ({info.num_classes} classes: "
                  f"{', '.join(info.class_names)})")
            print(f"data dir:  {data_dir}")
            print(f"store:     {store or f'not built yet (fetch writes it into {home})'}")
            print(f"mean/std:  {info.mean:.4f} / {info.std:.4f}")
            print(f"mirrors:   {' '.join(mirrors_for(info))} (${mirror_env_var(info.name)} "
                  "overrides)")
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

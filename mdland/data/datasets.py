"""Shard datasets as training data: their row counts, a Ray Dataset over them, and one shuffled epoch without Ray
(the plain-process mode). Shared by the ControlNet and detector trainers, each with its own `prepare` function."""

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

from mdland.data import storage
from mdland.data.shards import MANIFEST, read_manifest, read_shard, shard_uris

if TYPE_CHECKING:
    import ray.data


def count_rows(data: str) -> int:
    """Faces in a shard dataset (from the manifest, or the parquet footers)."""
    if storage.exists(storage.join(data, MANIFEST)):
        return int(read_manifest(data)["count"])
    uris = shard_uris(data)
    fs, _ = storage.filesystem(uris[0])
    return sum(pq.ParquetFile(fs.open_input_file(storage.filesystem(u)[1])).metadata.num_rows for u in uris)


def check_one_filesystem(datasets: list[str]) -> None:
    """Training datasets are read as one set of files, so they must all be local or all in S3."""
    kinds = {d: "s3" if storage.is_s3(d) else "local" for d in datasets}
    if len(set(kinds.values())) > 1:
        raise ValueError("data: datasets must all be local or all in S3 (they are read as one set of files); got "
                         + ", ".join(f"{d} ({k})" for d, k in kinds.items()))


def check_training_data(datasets: list[str], batch_size: int, num_workers: int) -> int:
    """Fail before any worker starts on training data that cannot fill a step; returns the faces in `datasets`."""
    if not datasets:
        raise ValueError("data: no training dataset given")
    check_one_filesystem(datasets)
    rows = 0
    for data in datasets:
        count = count_rows(data)
        if count == 0:
            raise ValueError(f"data: {data} is an empty dataset")
        rows += count
    if batch_size * num_workers > rows:
        raise ValueError(f"batch_size: {batch_size} x {num_workers} worker(s) is larger than the training set "
                         f"({rows} faces at {', '.join(datasets)})")
    return rows


# Sets up to this many faces (about 2 GB of encoded 256-px images) are shuffled in full every epoch.
FULL_SHUFFLE_ROWS = 20_000


def read_shards(datasets: list[str], columns: list[str], shuffle: bool = True) -> "ray.data.Dataset":
    """A Ray Dataset over the shards of one or more training datasets (all on one filesystem), in a new random order
    each epoch (in file order without `shuffle`). A small set is shuffled in full: stage 2's is one file per domain,
    so file order and the workers' local shuffle buffers alone would give runs of batches from one domain. A large one
    has its files read in a new order (no all-to-all barrier over the whole set), which with the local buffers mixes
    batches across files."""
    import ray.data

    check_one_filesystem(datasets)
    uris = [u for d in datasets for u in shard_uris(d)]
    fs, _ = storage.filesystem(uris[0])
    ds = ray.data.read_parquet([storage.filesystem(u)[1] for u in uris], filesystem=fs,
                               shuffle="files" if shuffle else None).select_columns(columns)
    if shuffle and sum(count_rows(d) for d in datasets) <= FULL_SHUFFLE_ROWS:
        return ds.random_shuffle()
    return ds


def local_epoch(datasets: list[str], columns: list[str], prepare: Callable[[dict], dict], batch_size: int,
                seed: int) -> Iterator[dict]:
    """One shuffled pass over shard datasets without Ray (the plain-process mode), through `prepare`."""
    tables = [read_shard(u).select(columns) for d in datasets for u in shard_uris(d)]
    rows = [(t, i) for t in tables for i in range(t.num_rows)]
    order = np.random.default_rng(seed).permutation(len(rows))
    for start in range(0, len(order) - batch_size + 1, batch_size):
        picked = [rows[j] for j in order[start : start + batch_size]]
        yield prepare({c: [t.column(c)[i].as_py() for t, i in picked] for c in columns})

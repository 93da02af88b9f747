"""Training batches for the ControlNet: target image in [-1, 1], condition image in [0, 1], prompt.

`prepare_batch` is the one preprocessing function; Ray Data maps it over shards for Ray Train workers, and the
plain-process mode applies it to shards read directly.
"""

from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from mdland.data import storage
from mdland.data.shards import (MANIFEST, decode_image, landmarks_from_rows, read_manifest, read_shard,
                                 shard_uris)
from mdland.landmarks.render import render_landmarks

COLUMNS = ["key", "image", "landmarks", "prompt"]


def prepare_batch(batch: dict, resolution: int) -> dict:
    """Decode, resize to `resolution`, render each face's condition from its (rescaled) landmarks."""
    pixels, conditions = [], []
    for key, data, points in zip(batch["key"], batch["image"], landmarks_from_rows(batch["landmarks"])):
        image = decode_image(data, str(key))
        h, w = image.shape[:2]
        if (h, w) != (resolution, resolution):
            image = np.asarray(Image.fromarray(image).resize((resolution, resolution), Image.Resampling.BICUBIC))
            # pixel-centre coordinates scale about -0.5
            points = (points + 0.5) * [resolution / w, resolution / h] - 0.5
        pixels.append(image.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)
        conditions.append(render_landmarks(points, resolution).transpose(2, 0, 1).astype(np.float32) / 255.0)
    return {"pixel_values": np.stack(pixels), "conditioning": np.stack(conditions),
            "prompt": np.asarray([str(p) for p in batch["prompt"]], dtype=object)}


def count_rows(data: str) -> int:
    """Faces in a shard dataset (from the manifest, or the parquet footers)."""
    if storage.exists(storage.join(data, MANIFEST)):
        return int(read_manifest(data)["count"])
    uris = shard_uris(data)
    fs, _ = storage.filesystem(uris[0])
    return sum(pq.ParquetFile(fs.open_input_file(storage.filesystem(u)[1])).metadata.num_rows for u in uris)


def read_shards(datasets: list[str], columns: list[str]):
    """A Ray Dataset over the shards of one or more datasets (all on one filesystem)."""
    import ray.data

    uris = [u for d in datasets for u in shard_uris(d)]
    fs, _ = storage.filesystem(uris[0])
    return ray.data.read_parquet([storage.filesystem(u)[1] for u in uris], filesystem=fs).select_columns(columns)


def ray_dataset(data: str, resolution: int):
    """A Ray Dataset of prepared ControlNet training batches over the shards of `data`."""
    return read_shards([data], COLUMNS).map_batches(prepare_batch, fn_kwargs={"resolution": resolution},
                                                    batch_format="numpy", batch_size=32)


def local_epoch(datasets: list[str], columns: list[str], prepare, batch_size: int, seed: int) -> Iterator[dict]:
    """One shuffled pass over shard datasets without Ray (the plain-process mode), through `prepare`."""
    tables = [read_shard(u).select(columns) for d in datasets for u in shard_uris(d)]
    rows = [(t, i) for t in tables for i in range(t.num_rows)]
    order = np.random.default_rng(seed).permutation(len(rows))
    for start in range(0, len(order) - batch_size + 1, batch_size):
        picked = [rows[j] for j in order[start : start + batch_size]]
        yield prepare({c: [t.column(c)[i].as_py() for t, i in picked] for c in columns})

"""Quick looks at data: landmarks drawn over images, tiled into a PNG grid."""

from pathlib import Path

import numpy as np
from PIL import Image

from mdland.config import check_count
from mdland.data.ingest import iter_samples, load_image
from mdland.data.shards import decode_image, landmarks_array, read_shard, shard_uris
from mdland.landmarks.render import draw_landmarks, image_grid, render_landmarks


def preview_pairs(src: str, count: int = 16, fmt: str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to `count` (image, landmarks) pairs from a shard dataset, one shard file, or a raw folder in `fmt`."""
    check_count("count", count)
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    if fmt:
        for sample in iter_samples(fmt, src):
            pairs.append((load_image(sample.image_path), sample.landmarks))
            if len(pairs) == count:
                break
        return pairs
    uris = [src] if src.endswith(".parquet") else shard_uris(src)
    for uri in uris:
        table = read_shard(uri)
        for data, points in zip(table.column("image").to_pylist(), landmarks_array(table)):
            pairs.append((decode_image(data, uri), points))
            if len(pairs) == count:
                return pairs
    return pairs


def write_preview(src: str, out: str | Path, count: int = 16, columns: int = 4, fmt: str | None = None,
                  condition: bool = False) -> int:
    """Write a PNG grid of images with their landmarks (and, with `condition`, the rendered condition beside each).

    Returns the number of faces drawn."""
    pairs = preview_pairs(src, count, fmt)
    if not pairs:
        raise ValueError(f"{src}: no faces to draw")
    tiles = []
    for image, points in pairs:
        tiles.append(draw_landmarks(image, points))
        if condition:
            tiles.append(render_landmarks(points, (image.shape[1], image.shape[0])))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(tiles, columns * (2 if condition else 1))).save(out)
    return len(pairs)

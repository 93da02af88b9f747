"""Quick looks at data: landmarks drawn over images, tiled into a PNG grid."""

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mdland.config import check_count
from mdland.data.ingest import iter_samples, load_image
from mdland.data.shards import decode_image, landmarks_array, read_shard, read_shard_columns, shard_uris
from mdland.landmarks.align import resize_points
from mdland.landmarks.render import draw_landmarks, image_grid, render_landmarks


def preview_pairs(src: str, count: int = 16, fmt: str | None = None,
                  image_dir: str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to `count` (image, landmarks) pairs from a shard dataset, one shard file, or a raw folder in `fmt`
    (`image_dir`: a STAR TSV's image folder, when not the TSV's own)."""
    check_count("count", count)
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    if fmt:
        for sample in iter_samples(fmt, src, image_dir=image_dir):
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
                  condition: bool = False, image_dir: str | None = None) -> int:
    """Write a PNG grid of images with their landmarks (and, with `condition`, the rendered condition beside each).

    Returns the number of faces drawn."""
    pairs = preview_pairs(src, count, fmt, image_dir)
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


def style_preview(root: str, styles: list[str], per_style: int = 4, size: int = 128) -> np.ndarray:
    """A grid with a row per style: its name, then its first `per_style` faces of the dataset at `root` with their
    landmarks drawn, each scaled down to at most `size` pixels. Reads shards in order until every row is full (a
    generated set cycles through its styles, so its first shard fills them), and no further than 4 full grids' worth
    of faces (a filtered set may hold few of a style)."""
    check_count("per_style", per_style)
    rows: dict[str, list[np.ndarray]] = {s: [] for s in styles}
    read = 0
    for uri in shard_uris(root):
        table = read_shard_columns(uri, ["style", "image", "landmarks"])
        for style, data, points in zip(table.column("style").to_pylist(), table.column("image"),
                                       landmarks_array(table)):
            if style in rows and len(rows[style]) < per_style:
                image = Image.fromarray(decode_image(data.as_py(), uri))
                scaled = image.resize(_fit(image.size, size), Image.Resampling.BOX) if max(image.size) > size \
                    else image
                rows[style].append(draw_landmarks(np.asarray(scaled), resize_points(points, image.size, scaled.size)))
        read += table.num_rows
        if all(len(faces) == per_style for faces in rows.values()) or read >= 4 * len(styles) * per_style:
            break
    tile = max((f.shape[0] for faces in rows.values() for f in faces), default=0)
    if not tile:
        raise ValueError(f"{root}: no faces of the styles {styles}")
    tiles = []
    for style, faces in rows.items():
        tiles.append(_label(style, tile))
        tiles += faces + [np.full((tile, tile, 3), 255, np.uint8)] * (per_style - len(faces))
    return image_grid(tiles, per_style + 1)


def _fit(size: tuple[int, int], longest: int) -> tuple[int, int]:
    scale = longest / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _label(text: str, side: int) -> np.ndarray:
    """A white square tile with `text` written on it, wrapped after its `_`, `-` and spaces to fit."""
    tile = Image.new("RGB", (side, side), "white")
    per_line = max(1, (side - 8) // 6)  # Pillow's default font at size 11 is about 6 px a character
    lines = [""]
    for part in re.split(r"(?<=[_\- ])", text):
        if lines[-1] and len(lines[-1]) + len(part) > per_line:
            lines.append("")
        lines[-1] += part
    ImageDraw.Draw(tile).multiline_text((4, 4), "\n".join(lines), fill="black", font=ImageFont.load_default(size=11))
    return np.asarray(tile)

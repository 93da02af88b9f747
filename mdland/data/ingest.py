"""Turn annotated image folders into shards: `mdland ingest --format F SRC DEST`.

Formats:
- `artface`: images with `.pts` files of the same name stem anywhere under SRC (300W / ArtFace).
- `cariface`: images with 68-line `.txt` files of the same stem (CariFace keeps them in a sibling folder).
- `folder`: images with either kind of landmark file.
- `ffhq`: SRC holds `ffhq-dataset-v2.json` and the images it names (`image` or `in_the_wild` variant).
- `star-tsv`: SRC is a STAR annotation TSV; image paths are relative to its folder (or `image_dir`), and the
  crop uses the TSV's own centre and scale.
Each face is cropped to a square around its landmarks (or the TSV's box) and resized to `size`, the landmarks
moved with it.
"""

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm
from PIL import Image, ImageOps, UnidentifiedImageError

from mdland.data import storage
from mdland.data.shards import MANIFEST, SWAPPING, Face, ShardWriter, encode_image, rgb_array
from mdland.landmarks.align import check_on_image, crop_face, crop_from_landmarks
from mdland.landmarks.io import files_by_key, read_ffhq_json, read_pts, read_star_tsv, read_txt
from mdland.log import get_logger

log = get_logger(__name__)

FORMATS = ("artface", "cariface", "folder", "ffhq", "star-tsv")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
_SIDECAR_READERS = {"artface": {".pts": read_pts}, "cariface": {".txt": read_txt},
                    "folder": {".pts": read_pts, ".txt": read_txt}}
SIDECAR_FORMATS = tuple(_SIDECAR_READERS)  # an annotation file beside each image: keyed as `predict` keys images


@dataclass
class Sample:
    key: str
    image_path: Path
    landmarks: np.ndarray
    crop: tuple[tuple[float, float], float] | None = None  # (centre, scale); None: from the landmarks


def skip_or_raise(message: str, skip_bad: bool, skipped: list[str] | None) -> None:
    """A bad face: raise its message, or with `skip_bad` log it and add it to `skipped` (when given)."""
    if not skip_bad:
        raise ValueError(message)
    log.warning("skipped: %s", message)
    if skipped is not None:
        skipped.append(message)


def iter_samples(fmt: str, src: str | Path, skip_bad: bool = False, ffhq_variant: str = "image",
                 image_dir: str | Path | None = None, skipped: list[str] | None = None) -> Iterator[Sample]:
    """The (image, landmarks) pairs of SRC in format `fmt`; bad ones raise, or are logged, added to `skipped` and
    left out. A sidecar-style file with no image that does not read as landmarks (a README.txt) is ignored."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown ingest format {fmt!r}; choose one of {FORMATS}")
    src = Path(src)
    if not src.exists():
        raise ValueError(f"{src}: source not found")

    if fmt in _SIDECAR_READERS:
        readers = _SIDECAR_READERS[fmt]
        images = files_by_key(src, IMAGE_SUFFIXES)
        marks = list(files_by_key(src, set(readers)).values())
        beside = {m.with_suffix(""): m for m in marks}
        by_stem: dict[str, list[Path]] = {}
        for m in marks:
            by_stem.setdefault(m.stem, []).append(m)

        def landmark_file(key: str, image: Path) -> Path | None:
            """The one beside the image (300W), else the only one of its name anywhere (CariFace keeps them in a
            folder of their own), unless images in several folders share the name (then it is keyed by path)."""
            near = beside.get(image.with_suffix(""))
            named = by_stem.get(image.stem, [])
            return near or (named[0] if key == image.stem and len(named) == 1 else None)

        pairs = {key: landmark_file(key, image) for key, image in images.items()}
        for mark in sorted(set(marks) - set(pairs.values())):
            try:
                readers[mark.suffix.lower()](mark)
            except ValueError as e:
                log.info("ignored (no image, not a landmark file): %s", e)
                continue
            skip_or_raise(f"{mark}: landmark file without an image", skip_bad, skipped)
        for key, image in images.items():
            if pairs[key] is None:
                skip_or_raise(f"{image}: image without a landmark file ({' or '.join(readers)})", skip_bad, skipped)
                continue
            try:
                yield Sample(key, image, readers[pairs[key].suffix.lower()](pairs[key]))
            except ValueError as e:
                skip_or_raise(str(e), skip_bad, skipped)
    elif fmt == "ffhq":
        meta = src / "ffhq-dataset-v2.json" if src.is_dir() else src
        for entry in read_ffhq_json(meta, ffhq_variant, lambda message: skip_or_raise(message, skip_bad, skipped)):
            yield Sample(f"ffhq-{entry.index}", meta.parent / entry.file_path, entry.landmarks)
    else:
        base = Path(image_dir) if image_dir else src.parent
        for i, row in enumerate(read_star_tsv(src, lambda message: skip_or_raise(message, skip_bad, skipped))):
            path = star_image_path(row.image_path)
            yield Sample(f"{Path(path).stem}-{i}", base / path, row.landmarks, (row.center, row.scale))


def star_image_path(path: str) -> str:
    """A STAR TSV's image path as STAR's loader reads it: `/` separators, and relative to the image folder where
    STAR's files name their own `rawImages` folder (`./rawImages/...`, or a network share for WFLW's test set)."""
    path = path.replace("\\", "/")
    if path.startswith(("./rawImages/", "//")) and "rawImages/" in path:
        path = path.split("rawImages/", 1)[1]
    return path


def load_image(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, upright as viewers show it, or a ValueError naming the file."""
    try:
        with Image.open(path) as im:
            # A photo stored sideways with an EXIF turn: annotations and predictions refer to the upright image, as
            # cv2.imread (STAR's reader) and `mdland serve` give it.
            return rgb_array(ImageOps.exif_transpose(im))
    except FileNotFoundError:
        raise ValueError(f"{path}: image file not found") from None
    except Image.DecompressionBombError as e:  # PIL's guard against decompression bombs (~179 megapixels)
        raise ValueError(f"{path}: image too large to read ({str(e).split(',')[0]}); downscale it") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: unreadable image ({e})") from None


def style_prompt(style: str) -> str:
    """The prompt of a shipped style ("" for no style)."""
    from mdland.generation.plan import DEFAULT_STYLES, load_styles

    if not style:
        return ""
    shipped = {s["name"]: s["prompt"] for s in load_styles(DEFAULT_STYLES)}
    if style not in shipped:
        raise ValueError(f"style {style!r} is not one of the shipped styles ({', '.join(shipped)}); give its prompt")
    return shipped[style]


def _swap_in(staging: str, dest: str, old_shards: list[str], manifest: dict) -> None:
    """Replace the dataset at `dest` by the complete one in `staging`. A marker stays in `dest` until the new
    manifest is in: readers refuse a swap cut short (old and new shards mixed), and the next ingest redoes it."""
    storage.write_bytes(storage.join(dest, SWAPPING), staging.encode())
    storage.delete(storage.join(dest, MANIFEST))
    new = [s["name"] for s in manifest["shards"]]
    for shard in new:
        storage.write_bytes(storage.join(dest, shard), storage.read_bytes(storage.join(staging, shard)))
    for shard in set(old_shards) - set(new):  # shards of the old dataset the new one did not replace
        storage.delete(storage.join(dest, shard))
    storage.write_bytes(storage.join(dest, MANIFEST), storage.read_bytes(storage.join(staging, MANIFEST)))
    storage.delete(storage.join(dest, SWAPPING))
    storage.delete_folder(staging)


def ingest(fmt: str, src: str | Path, dest: str, size: int = 256, margin: float = 1.25, rows_per_shard: int = 1000,
           skip_bad: bool = False, overwrite: bool = False, ffhq_variant: str = "image",
           image_dir: str | Path | None = None, source: str | None = None, style: str = "",
           prompt: str | None = None) -> dict:
    """Crop, resize and write SRC's faces as shards under DEST; returns the manifest. `style` names the faces'
    domain (stage 2's multi-domain sets); `prompt` defaults to that style's prompt in the shipped styles file."""
    prompt = style_prompt(style) if prompt is None else prompt
    marker = storage.join(dest, SWAPPING)
    cut_short = storage.exists(marker)
    replacing = cut_short or storage.exists(storage.join(dest, MANIFEST))
    if replacing and not overwrite:
        raise ValueError(f"{dest}: already holds a dataset (manifest.json); use --overwrite (overwrite=True) to "
                         "replace it")
    storage.check_writable(dest)
    # Read every landmark file and place every crop before writing anything, so bad annotations fail before any
    # shard is written.
    samples, skipped = [], []  # skipped: one message per face left out, naming its file, kept in the manifest
    for sample in iter_samples(fmt, src, skip_bad, ffhq_variant, image_dir, skipped):
        try:
            samples.append((sample, sample.crop or crop_from_landmarks(sample.landmarks, margin)))
        except ValueError as e:
            skip_or_raise(f"{sample.image_path}: {e}", skip_bad, skipped)
    if not samples:
        raise ValueError(f"{src}: no usable (image, landmarks) pairs found for format {fmt!r}")
    name = source or fmt
    config = {"format": fmt, "src": str(src), "size": size, "margin": margin}
    # A replacement is written beside the old dataset (in a hidden folder readers skip) and swapped in only once
    # every face is in: a bad image halfway through leaves the old dataset as it was.
    if cut_short:  # the staging folder of the swap that was cut short
        storage.delete_folder(storage.read_bytes(marker).decode())
    old_shards = [u.rsplit("/", 1)[-1] for u in storage.list_files(dest, ".parquet")] if replacing else []
    target = storage.join(dest, f".ingest-{uuid.uuid4().hex[:8]}") if replacing else dest
    writer = ShardWriter(target, rows_per_shard, config)
    try:
        for sample, (centre, scale) in tqdm(samples, desc=f"ingest {fmt}", unit="face", mininterval=2):
            try:
                image = load_image(sample.image_path)
                check_on_image(sample.landmarks, image.shape, sample.image_path)
            except ValueError as e:
                skip_or_raise(str(e), skip_bad, skipped)
                continue
            crop, points, _ = crop_face(image, sample.landmarks, centre, scale, size)
            writer.add(Face(image=encode_image(crop), landmarks=points, key=sample.key, source=name, style=style,
                            prompt=prompt))
        manifest = writer.close(skipped=skipped)
    except BaseException:
        if target != dest:
            storage.delete_folder(target)
        else:  # a new dataset: take back its shards, or readers would take them for a set without a manifest
            for shard in writer.written:
                storage.delete(storage.join(dest, shard["name"]))
        raise
    if target != dest:
        _swap_in(target, dest, old_shards, manifest)
    log.info("ingested %d faces from %s into %d shard(s) at %s", manifest["count"], src, len(manifest["shards"]), dest)
    return manifest


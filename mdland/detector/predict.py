"""`mdland predict`: a detector over a folder of images. Each face's landmarks go to `<key>.pts` (what
`mdland evaluate-preds` and annotation tools read; the key is the image's name stem, or its path under the folder where
names repeat across folders: `files_by_key`), all of them with their boxes to `predictions.json`, and the first
faces with their points drawn to `overlays.png`."""

import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from mdland.config import check_count
from mdland.data import storage
from mdland.data.ingest import IMAGE_SUFFIXES, load_image, skip_or_raise
from mdland.detector.evaluate import overlay_tile
from mdland.landmarks.align import check_face_box, crop_from_edge_box, crop_matrix, warp_image
from mdland.landmarks.io import LANDMARK_SUFFIXES, files_by_key, write_pts
from mdland.landmarks.render import image_grid
from mdland.log import get_logger

log = get_logger(__name__)
PREDICTIONS = "predictions.json"
OVERLAY_FACES = 16


def read_boxes(path: str, keys: set[str]) -> dict[str, list[float]]:
    """Face boxes from a JSON file {image key: [x0, y0, x1, y1]} (pixel-edge coordinates, as face detectors give
    them), each naming an image of the folder."""
    try:
        boxes = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a JSON file of face boxes ({str(e).splitlines()[0]})") from None
    if not isinstance(boxes, dict):
        raise ValueError(f"{path}: expected an object {{image key: [x0, y0, x1, y1]}}, got a {type(boxes).__name__}")
    unknown = sorted(boxes.keys() - keys)
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} box(es) for images the folder does not have, e.g. {unknown[:3]}")
    for key, box in boxes.items():
        if not isinstance(box, list) or not all(isinstance(v, (int, float)) for v in box):
            raise ValueError(f"{path}: {key}: expected [x0, y0, x1, y1], got {box!r:.80}")
    return boxes


def read_face(path: Path, box: list[float] | None) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """An image and its face box, checked (the whole image without one), or a ValueError naming the file."""
    image = load_image(path)
    height, width = image.shape[:2]
    try:
        return image, check_face_box([0, 0, width, height] if box is None else box, width, height)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def earlier_faces(out: str, src: Path) -> list[str]:
    """The faces an earlier `predict` wrote to `out` (its files are replaced), after refusing an output that would
    mix with the images or overwrite landmark files `predict` did not write (the images' own annotations)."""
    if not storage.is_s3(out):
        here, images = Path(out).resolve(), src.resolve()
        if here.is_relative_to(images) or images.is_relative_to(here):  # the next run would read the outputs
            raise ValueError(f"--out {out}: is, or is inside, or holds the image folder {src}; give one apart")
    listing = storage.join(out, PREDICTIONS)
    earlier = []
    if storage.exists(listing):
        try:
            earlier = list(json.loads(storage.read_bytes(listing))["faces"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{listing}: not a listing mdland predict wrote; give another --out") from None
    ours = {storage.join(out, f"{key}.pts") for key in earlier}
    foreign = [uri for suffix in LANDMARK_SUFFIXES for uri in storage.list_files(out, suffix, recursive=True)
               if uri not in ours]
    if foreign:  # nested keys (files_by_key) reach into subfolders: so does the check
        raise ValueError(f"--out {out}: holds landmark files mdland predict did not write, e.g. {foreign[0]}; give "
                         "another folder")
    return earlier


def predict_folder(detector: str, src: str, out: str, boxes: str | None = None, batch_size: int = 32,
                   skip_bad: bool = False) -> dict:
    """The detector's landmarks for every image under `src` (each image one face: its box from `boxes`, else the
    whole image), written to `out` (local or s3://). Returns {"count", "skipped"}."""
    from mdland.detector.checkpoint import load_detector
    from mdland.detector.inference import predict_crops
    from mdland.session import pick_device

    check_count("batch_size", batch_size)
    root = Path(src)
    if not root.is_dir():
        raise ValueError(f"{src}: not a folder of images")
    images = files_by_key(root, IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{src}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    face_boxes = read_boxes(boxes, set(images)) if boxes else {}
    whole = sorted(images.keys() - face_boxes.keys()) if boxes else []
    if whole:  # allowed (faces already cropped beside detected ones), but not silently
        log.warning("%d image(s) have no box in %s and are taken whole, e.g. %s", len(whole), boxes, whole[:3])
    storage.check_writable(out)  # a missing bucket found now, not after the inference
    earlier = earlier_faces(out, root)
    net = load_detector(detector, device=pick_device(use_gpu=True)).eval()  # fp32 as `evaluate`, on a GPU if any
    size = net.arch.input_size
    faces, skipped, tiles = {}, [], []
    keys = sorted(images)
    # Written beside first: a run that fails before its last image leaves `out` as it was.
    with tempfile.TemporaryDirectory() as staging:
        for start in tqdm(range(0, len(keys), batch_size), desc="predict", unit="batch", mininterval=2):
            batch = []
            for key in keys[start : start + batch_size]:
                try:
                    image, box = read_face(images[key], face_boxes.get(key))
                except ValueError as e:
                    skip_or_raise(str(e), skip_bad, skipped)
                    continue
                matrix = crop_matrix(*crop_from_edge_box(box), size)
                batch.append((key, image, box, warp_image(image, matrix, size), matrix))
            if not batch:
                continue
            points = predict_crops(net, [b[3] for b in batch], [b[4] for b in batch])
            for (key, image, box, _, _), p in zip(batch, points):
                (Path(staging) / key).parent.mkdir(parents=True, exist_ok=True)  # a key with folders (files_by_key)
                write_pts(Path(staging) / f"{key}.pts", p)
                faces[key] = {"file": str(images[key].relative_to(root)), "box": list(box),
                               "landmarks": np.round(p.astype(np.float64), 3).tolist()}
                if len(tiles) < OVERLAY_FACES:
                    tiles.append(overlay_tile(image, crop_from_edge_box(box), p))
        if not faces:
            raise ValueError(f"{src}: no image could be read")
        Image.fromarray(image_grid(tiles, columns=int(np.ceil(np.sqrt(len(tiles)))))).save(
            Path(staging) / "overlays.png")
        # Marked incomplete while files change, listing every face that may have a file, so a copy cut short is
        # known for one and the next run into `out` clears what it leaves.
        listing = storage.join(out, PREDICTIONS)
        storage.write_bytes(listing, _listing(detector, dict.fromkeys({*earlier, *faces}), skipped, complete=False))
        storage.copy_from_local(staging, out)
    for key in set(earlier) - faces.keys():  # an earlier run's faces this one has not (evaluate-preds would read them)
        storage.delete(storage.join(out, f"{key}.pts"))
    storage.write_bytes(listing, _listing(detector, faces, skipped, complete=True))
    log.info("%d face(s) predicted into %s (%d skipped)", len(faces), out, len(skipped))
    return {"count": len(faces), "skipped": len(skipped)}


def _listing(detector: str, faces: dict, skipped: list[str], complete: bool) -> bytes:
    return json.dumps({"detector": detector, "complete": complete, "faces": faces, "skipped": skipped},
                      indent=1).encode()

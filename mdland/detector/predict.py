"""`mdland predict`: a detector over a folder of images. Each face's landmarks go to `<stem>.pts` (what
`mdland evaluate-preds` and annotation tools read), all of them with their boxes to `predictions.json`, and the first
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
from mdland.landmarks.align import box_crop_matrix, check_face_box, transform_points, warp_image
from mdland.landmarks.io import LANDMARK_SUFFIXES, files_by_stem, write_pts
from mdland.landmarks.render import draw_landmarks, image_grid
from mdland.log import get_logger

log = get_logger(__name__)
PREDICTIONS = "predictions.json"
OVERLAY_FACES = 16
OVERLAY_MARGIN = 1.2  # an overlay tile's side / the face box's: points that stray outside the box still show


def read_boxes(path: str, stems: set[str]) -> dict[str, list[float]]:
    """Face boxes from a JSON file {image stem: [x0, y0, x1, y1]} (pixel-edge coordinates, as face detectors give
    them), each naming an image of the folder."""
    try:
        boxes = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a JSON file of face boxes ({str(e).splitlines()[0]})") from None
    if not isinstance(boxes, dict):
        raise ValueError(f"{path}: expected an object {{image stem: [x0, y0, x1, y1]}}, got a {type(boxes).__name__}")
    unknown = sorted(boxes.keys() - stems)
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} box(es) for images the folder does not have, e.g. {unknown[:3]}")
    for stem, box in boxes.items():
        if not isinstance(box, list) or not all(isinstance(v, (int, float)) for v in box):
            raise ValueError(f"{path}: {stem}: expected [x0, y0, x1, y1], got {box!r:.80}")
    return boxes


def read_face(path: Path, box: list[float] | None) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """An image and its face box, checked (the whole image without one), or a ValueError naming the file."""
    image = load_image(path)
    height, width = image.shape[:2]
    try:
        return image, check_face_box([0, 0, width, height] if box is None else box, width, height)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def check_output(out: str, src: Path) -> None:
    """Refuse an output folder whose landmark files `predict` did not write: the images' own annotations."""
    if not storage.is_s3(out) and Path(out).resolve() == src.resolve():
        raise ValueError(f"--out {out}: is the image folder; predictions go to a folder of their own")
    if storage.exists(storage.join(out, PREDICTIONS)):
        return  # an earlier prediction's: its files are replaced
    if any(storage.list_files(out, suffix) for suffix in LANDMARK_SUFFIXES):
        raise ValueError(f"--out {out}: holds landmark files mdland predict did not write (no {PREDICTIONS}); "
                         "give another folder")


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
    images = files_by_stem(root, IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{src}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    face_boxes = read_boxes(boxes, set(images)) if boxes else {}
    storage.check_writable(out)  # a missing bucket found now, not after the inference
    check_output(out, root)
    net = load_detector(detector, device=pick_device(use_gpu=True)).eval()  # fp32 as `evaluate`, on a GPU if any
    size = net.arch.input_size
    faces, skipped, tiles = {}, [], []
    stems = sorted(images)
    # Written beside, then copied over with predictions.json last: a run that fails leaves `out` as it was, and a
    # folder with predictions.json is complete.
    with tempfile.TemporaryDirectory() as staging:
        for start in tqdm(range(0, len(stems), batch_size), desc="predict", unit="batch", mininterval=2):
            batch = []
            for stem in stems[start : start + batch_size]:
                try:
                    image, box = read_face(images[stem], face_boxes.get(stem))
                except ValueError as e:
                    skip_or_raise(str(e), skip_bad, skipped)
                    continue
                matrix = box_crop_matrix(box, size)
                batch.append((stem, image, box, warp_image(image, matrix, size), matrix))
            if not batch:
                continue
            points = predict_crops(net, [b[3] for b in batch], [b[4] for b in batch])
            for (stem, image, box, _, _), p in zip(batch, points):
                write_pts(Path(staging) / f"{stem}.pts", p)
                faces[stem] = {"file": str(images[stem].relative_to(root)), "box": list(box),
                               "landmarks": np.round(p.astype(np.float64), 3).tolist()}
                if len(tiles) < OVERLAY_FACES:
                    tiles.append(overlay_tile(image, box, p))
        if not faces:
            raise ValueError(f"{src}: no image could be read")
        Image.fromarray(image_grid(tiles, columns=int(np.ceil(np.sqrt(len(tiles)))))).save(
            Path(staging) / "overlays.png")
        storage.copy_from_local(staging, out)
    storage.write_bytes(storage.join(out, PREDICTIONS), json.dumps(
        {"detector": detector, "faces": faces, "skipped": skipped}, indent=1).encode())
    log.info("%d face(s) predicted into %s (%d skipped)", len(faces), out, len(skipped))
    return {"count": len(faces), "skipped": len(skipped)}


def overlay_tile(image: np.ndarray, box: tuple[float, float, float, float], points: np.ndarray,
                 size: int = 192) -> np.ndarray:
    """The face box and a margin around it, with the predicted points drawn."""
    x0, y0, x1, y1 = box
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * OVERLAY_MARGIN / 2
    matrix = box_crop_matrix((cx - half, cy - half, cx + half, cy + half), size)
    return draw_landmarks(warp_image(image, matrix, size), transform_points(points, matrix))

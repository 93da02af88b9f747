"""Scoring landmark predictions against ground truth: tables (JSON + markdown) and CED plots."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from mdland.config import check_count
from mdland.data import storage
from mdland.data.ingest import iter_samples, load_image, skip_or_raise
from mdland.data.shards import MANIFEST, decode_image, landmarks_array, read_dataset
from mdland.detector.metrics import check_threshold, nme, normalising_distance, plot_ced, summarise
from mdland.landmarks.align import check_on_image
from mdland.landmarks.io import LANDMARK_SUFFIXES, files_by_key, read_landmark_file
from mdland.landmarks.render import draw_landmarks, image_grid
from mdland.landmarks.scheme import check_shape
from mdland.log import get_logger

log = get_logger(__name__)
OVERLAY_MARGIN = 1.2  # an overlay tile's side / the evaluation crop's: predictions that stray outside it still show


def read_landmark_set(path: str, fmt: str | None = None) -> dict[str, np.ndarray]:
    """Key -> (68, 2) landmarks from a folder of `.pts`/`.txt` files, searched recursively (key: `files_by_key`'s,
    as `predict` names its files), an annotated folder in ingest format `fmt` (key: its images', so `predict`'s
    output of that folder pairs with it), an `.npy` array of shape (N, 68, 2) (key: row index), or a shard dataset
    (key: the `key` column)."""
    if fmt is not None:
        return {s.key: s.landmarks for s in iter_samples(fmt, path)}
    p = Path(path)
    if p.suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ValueError(f"{p}: not a NumPy array file ({str(e).splitlines()[0]})") from None
        if arr.ndim != 3 or arr.shape[1:] != (68, 2):
            raise ValueError(f"{p}: expected an (N, 68, 2) array, got shape {arr.shape}")
        return {str(i): check_shape(a, f"{p}: row {i}") for i, a in enumerate(arr)}
    if p.is_dir() and not (p / MANIFEST).exists() and not any(p.glob("*.parquet")):
        files = files_by_key(p, set(LANDMARK_SUFFIXES))
        if not files:
            raise ValueError(f"{p}: no landmark files ({', '.join(LANDMARK_SUFFIXES)}) and no shard dataset")
        found = {}
        for key, f in files.items():
            try:
                found[key] = read_landmark_file(f)
            except ValueError as e:
                if f.suffix.lower() != ".txt":
                    raise
                log.info("ignored (not a landmark file): %s", e)  # datasets ship split lists and READMEs as .txt
        return found
    table = read_dataset(path)
    return dict(zip(table.column("key").to_pylist(), landmarks_array(table)))


def evaluate_predictions(pred: str, gt: str, out: str | None = None, norm: str = "inter_ocular",
                         threshold: float = 0.10, name: str = "predictions", fmt: str | None = None) -> dict:
    """Pair predictions with ground truth (read in ingest format `fmt` if given) by key and score them; with `out`,
    write metrics.json/.md and ced.png."""
    predicted, truth = read_landmark_set(pred), read_landmark_set(gt, fmt)
    missing = sorted(truth.keys() - predicted.keys())
    if missing:
        raise ValueError(f"{pred}: no prediction for {len(missing)} ground-truth face(s), e.g. {missing[:3]}")
    unscored = sorted(predicted.keys() - truth.keys())
    if unscored:  # predictions on more faces than are annotated are fine, but the count should not surprise
        log.warning("%d prediction(s) without ground truth in %s are not scored, e.g. %s", len(unscored), gt,
                    unscored[:3])
    keys = sorted(truth)
    p = np.stack([predicted[k] for k in keys])
    g = np.stack([truth[k] for k in keys])
    try:
        errors = nme(p, g, norm, names=keys)
    except ValueError as e:
        raise ValueError(f"{gt}: {e}") from None
    result = {"name": name, **summarise(errors, norm, threshold).as_dict()}
    if out:
        with storage.staged_folder(out) as out_dir:
            (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
            (out_dir / "metrics.md").write_text(metrics_table([result]))
            plot_ced({name: errors}, out_dir / "ced.png", threshold)
    return result


def metrics_table(rows: list[dict]) -> str:
    """The paper's table layout: NME (%), FR@t (%), AUC@t per evaluation set."""
    t = rows[0]["threshold"] * 100 if rows else 10
    lines = [f"| set | faces | NME (%) | FR@{t:g}% (%) | AUC@{t:g}% |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['count']} | {r['nme'] * 100:.2f} | {r['fr'] * 100:.2f} | {r['auc']:.4f} |")
    notes = [f"{r['name']}: {len(r['skipped'])} bad face(s) skipped (listed in metrics.json)" for r in rows
             if r.get("skipped")]
    return "\n".join(lines) + "\n" + "".join(f"\n{n}\n" for n in notes)


@dataclass
class EvalFace:
    key: str
    image: np.ndarray
    landmarks: np.ndarray
    crop: tuple[tuple[float, float], float] | None = None  # (centre, scale) the set gives (STAR TSVs do)


def eval_faces(src: str, fmt: str | None = None, skip_bad: bool = False, skipped: list[str] | None = None,
               norm: str = "inter_ocular", image_dir: str | None = None) -> list[EvalFace]:
    """Faces of an evaluation set: a shard dataset, or a raw folder in an ingest format (artface, cariface, ...;
    `image_dir`: the folder a STAR TSV's image paths are relative to, when not the TSV's own).
    Bad faces (no landmarks, wrong point count, unreadable image, landmarks whose `norm` distance is zero) fail
    naming the file or key, or are logged, added to `skipped` and left out, before any inference."""
    faces = []
    if fmt is None:
        table = read_dataset(src)
        faces = [EvalFace(k, decode_image(im, f"{src}: {k}"), p) for k, im, p in
                 zip(table.column("key").to_pylist(), table.column("image").to_pylist(), landmarks_array(table))]
        where = {f.key: f"{src}: {f.key}" for f in faces}
    else:
        where = {}
        for sample in iter_samples(fmt, src, skip_bad=skip_bad, image_dir=image_dir, skipped=skipped):
            try:
                image = load_image(sample.image_path)
                check_on_image(sample.landmarks, image.shape, sample.image_path)
                faces.append(EvalFace(sample.key, image, sample.landmarks, sample.crop))
                where[sample.key] = str(sample.image_path)
            except ValueError as e:
                skip_or_raise(str(e), skip_bad, skipped)
    if faces:
        zero = normalising_distance(np.stack([f.landmarks for f in faces]), norm) <= 0
        for face in (f for f, z in zip(faces, zero) if z):
            skip_or_raise(f"{where[face.key]}: normalising distance ({norm}) is zero", skip_bad, skipped)
        faces = [f for f, z in zip(faces, zero) if not z]
    if not faces:
        raise ValueError(f"{src}: no faces to evaluate")
    return faces


def evaluate_detector(detector: str, sets: list[tuple[str, str, str | None]], out: str, skip_bad: bool = False,
                      batch_size: int = 32, threshold: float = 0.10, norm: str = "inter_ocular",
                      image_dir: str | None = None) -> list[dict]:
    """Run the detector over each (name, source, format) set; write metrics.json/.md, ced.png, overlays and
    per-face.json ({set: [{"key", "nme"}, ...]}: the faces behind the numbers, to find the bad ones or compare runs).
    An earlier report's overlays of sets this run has not are removed."""
    from mdland.detector.checkpoint import load_detector
    from mdland.detector.inference import predict
    from mdland.session import pick_device

    check_threshold(threshold)
    check_count("batch_size", batch_size)
    storage.check_writable(out)  # a missing bucket found now, not after the inference
    net = load_detector(detector, device=pick_device(use_gpu=True)).eval()  # fp32, on a GPU when there is one
    # Every set read and checked before any inference: a bad later set fails before the report is touched.
    loaded = []
    for name, src, fmt in sets:
        skipped: list[str] = []
        loaded.append((name, eval_faces(src, fmt, skip_bad, skipped, norm, image_dir), skipped))
    rows, curves, per_face, overlays = [], {}, {}, {}
    for name, faces, skipped in loaded:
        preds = []
        for start in tqdm(range(0, len(faces), batch_size), desc=f"evaluate {name}", unit="batch", mininterval=2):
            chunk = faces[start : start + batch_size]
            preds.append(predict(net, [f.image for f in chunk], [eval_crop(f) for f in chunk]))
        pred = np.concatenate(preds)
        errors = nme(pred, np.stack([f.landmarks for f in faces]), norm)
        curves[name] = errors
        per_face[name] = [{"key": f.key, "nme": float(e)} for f, e in zip(faces, errors)]
        rows.append({"name": name, **summarise(errors, norm, threshold).as_dict(), "skipped": skipped})
        overlays[name] = overlay_grid(faces, pred, errors)
    with storage.staged_folder(out) as out_dir:
        for name, grid in overlays.items():
            Image.fromarray(grid).save(out_dir / f"overlays-{name}.png")
        (out_dir / "metrics.json").write_text(json.dumps(rows, indent=1))
        (out_dir / "metrics.md").write_text(metrics_table(rows))
        (out_dir / "per-face.json").write_text(json.dumps(per_face, indent=1))
        plot_ced(curves, out_dir / "ced.png", threshold)
    written = {f"overlays-{name}.png" for name in overlays}
    for uri in storage.list_files(out, ".png"):
        file = uri.rsplit("/", 1)[-1]
        if file.startswith("overlays-") and file not in written:
            storage.delete(uri)
    return rows


def eval_crop(face: EvalFace) -> tuple[tuple[float, float], float]:
    """The crop a face is evaluated in: the set's own where it gives one (STAR's TSVs), else one from the
    ground-truth landmarks, as 300W-style evaluations do."""
    from mdland.detector.data import CROP_MARGIN
    from mdland.landmarks.align import crop_from_landmarks

    return face.crop or crop_from_landmarks(face.landmarks, CROP_MARGIN)


def overlay_grid(faces: list[EvalFace], pred: np.ndarray, errors: np.ndarray, count: int = 6,
                 size: int = 192) -> np.ndarray:
    """The worst predictions on the top row, the best on the bottom (prediction green, truth red), each tile the
    face's evaluation crop and a margin around it, undistorted. A set of fewer than 2 * `count` faces shows each face
    once."""
    order = np.argsort(errors)
    worst = min(count, (len(faces) + 1) // 2)
    picks = list(order[::-1][:worst]) + list(order[: min(count, len(faces) - worst)])
    tiles = [overlay_tile(faces[i].image, eval_crop(faces[i]), pred[i], faces[i].landmarks, size) for i in picks]
    return image_grid(tiles, columns=worst)


def overlay_tile(image: np.ndarray, crop: tuple[tuple[float, float], float], points: np.ndarray,
                 truth: np.ndarray | None = None, size: int = 192) -> np.ndarray:
    """A face's crop (centre, scale) and a margin around it, undistorted, the predicted points green over it and
    the truth, when given, red."""
    from mdland.landmarks.align import crop_matrix, transform_points, warp_image

    centre, scale = crop
    matrix = crop_matrix(centre, scale * OVERLAY_MARGIN, size)
    return draw_landmarks(warp_image(image, matrix, size), transform_points(points, matrix), (0, 255, 0),
                          None if truth is None else transform_points(truth, matrix), (255, 0, 0))

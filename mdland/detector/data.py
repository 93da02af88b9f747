"""Detector inputs and targets, as STAR prepares them: a square crop around the face (centre and scale), optional
flip / rotation / scale / shift and texture (occlusion, blur, gamma, noise, grey) augmentation, landmarks in [-1, 1],
Gaussian point maps and edge maps at a quarter of the input size. Crops stay RGB uint8 (a quarter of float32's bytes
through Ray Data); `mdland.detector.model.to_network_input` scales them on the device."""

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mdland.data.shards import decode_image, landmarks_from_rows
from mdland.detector.model import EDGES
from mdland.landmarks.align import crop_from_landmarks, crop_matrix, transform_points, warp_image
from mdland.landmarks.scheme import flip_landmarks

COLUMNS = ["key", "image", "landmarks"]
# Crop side / the landmark box's longer side, for training and evaluation alike. STAR's released models were trained
# on crops of 1.05x the box's shorter side (its demo.py): for a typical face (longer / shorter ~1.08) this is the same
# scale, 5-10% wider, and unlike a shorter-side crop it never cuts off a caricature's long chin or wide cheeks.
CROP_MARGIN = 1.05


def augmentation_matrix(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random geometry about the crop centre with STAR's sigmas: shift 5% of the side, roll 18 deg, scale 0.1.
    STAR draws them unclipped; here each is clipped at two sigmas so no face is turned or pushed out of its crop."""
    angle = np.deg2rad(np.clip(rng.normal(0, 18), -36, 36))
    scale = np.clip(rng.normal(1, 0.1), 0.8, 1.2)
    shift = np.clip(rng.normal(0, 0.05, 2), -0.1, 0.1) * (size - 1)
    c = (size - 1) / 2
    cos, sin = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[cos, -sin, c - cos * c + sin * c + shift[0]], [sin, cos, c - sin * c - cos * c + shift[1]],
                     [0, 0, 1]])


def face_crop(image: np.ndarray, points: np.ndarray, size: int,
              rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(crop RGB uint8, landmarks in crop pixels, source->crop matrix). With `rng`: random flip and geometry."""
    if rng is not None and rng.random() < 0.5:
        image = image[:, ::-1]
        points = flip_landmarks(points, image.shape[1])
    centre, scale = crop_from_landmarks(points, CROP_MARGIN)
    matrix = crop_matrix(centre, scale, size)
    if rng is not None:
        matrix = augmentation_matrix(rng, size) @ matrix
    return warp_image(np.ascontiguousarray(image), matrix, size), transform_points(points, matrix), matrix


def texture_augment(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """STAR's texture augmentation of an RGB uint8 crop, each part at STAR's rate: a black box over up to 40% of
    the side (0.4), a box blur up to 5% of the side (0.3), a gamma in [0.25, 4) (0.2), a blend with up to 50%
    uniform noise (0.2), grey (0.2). Faces in paintings and cartoons are often partly hidden, soft or flat."""
    out = crop.copy()
    h, w = out.shape[:2]
    if rng.random() < 0.4:
        height = 0.2 + 0.6 * rng.random()
        width = height - 0.2 + 0.4 * rng.random()
        cy, cx = rng.random() * (h - 1), rng.random() * (w - 1)
        dy, dx = h * height / 4, w * width / 4  # half extents: the box is at most 40% of the side
        out[int(max(0, cy - dy)):int(cy + dy) + 1, int(max(0, cx - dx)):int(cx + dx) + 1] = 0
    if rng.random() < 0.3:
        kernel = int(0.05 * rng.random() * (h + w) / 2)
        if kernel > 1:
            out = np.asarray(Image.fromarray(out).filter(ImageFilter.BoxBlur((kernel - 1) / 2)))
    if rng.random() < 0.2:
        gamma = 0.25 + 0.75 * rng.random() if rng.random() < 0.5 else 1 + 3 * rng.random()
        out = ((out / 255.0) ** gamma * 255).astype(np.uint8)
    if rng.random() < 0.2:
        alpha = 0.5 * rng.random()
        out = ((1 - alpha) * out + alpha * rng.integers(0, 256, out.shape)).astype(np.uint8)
    if rng.random() < 0.2:
        out = np.repeat(np.asarray(Image.fromarray(out).convert("L"))[..., None], 3, axis=-1)
    return out


def point_maps(points: np.ndarray, size: int, sigma: float = 1.5) -> np.ndarray:
    """(68, S/4, S/4) unnormalised Gaussians (peak 1, sigma 1.5 input pixels: 0.375 map cells, as STAR's at S=256,
    whatever S; scaled down with S they would fall between the cells' centres) sampled where STAR's
    bilinear 4x downscaling samples them. A point that augmentation moved out of the crop is held at the map's edge,
    as STAR's heatmap encoder holds it (and as its STAR-loss target is held), so the maps never go empty."""
    h = size // 4
    centres = np.arange(h) * 4 + 1.5
    points = np.clip(points, centres[0], centres[-1])
    gx = np.exp(-((centres[None, :] - points[:, :1]) ** 2) / (2 * sigma * sigma))
    gy = np.exp(-((centres[None, :] - points[:, 1:]) ** 2) / (2 * sigma * sigma))
    return (gy[:, :, None] * gx[:, None, :]).astype(np.float32)


def edge_curve(points: np.ndarray, closed: bool, density: int = 5) -> np.ndarray:
    """An edge's points joined by a cubic spline through them, `density` samples per segment, as STAR draws its
    edges (the points themselves where no spline fits, e.g. two of them coincide)."""
    from scipy.interpolate import splev, splprep

    pts = np.concatenate([points, points[:1]]) if closed else points
    try:
        tck, u = splprep([pts[:, 0], pts[:, 1]], s=0, per=int(closed), k=3)
    except (ValueError, TypeError):  # FITPACK's refusals of degenerate point sets
        return np.asarray(points, np.float64)
    at = np.concatenate([np.linspace(u[i], u[i + 1], density, endpoint=False) for i in range(len(u) - 1)]
                        + ([] if closed else [u[-1:]]))
    return np.stack(splev(at, tck), axis=-1)


def edge_maps(points: np.ndarray, size: int) -> np.ndarray:
    """(9, S/4, S/4): each edge's spline (as STAR draws it) one input pixel wide and anti-aliased (drawn 4x
    supersampled), area-averaged down 4x: a 1-pixel line reads 0.25. STAR samples its maps down bilinearly, which
    reads the same line as 0.5 or 0 by where it crosses the 4-pixel grid: the same value on average, with holes.
    Only a window around each edge is drawn; the rest of its map is 0."""
    h = size // 4
    out = np.zeros((len(EDGES), h, h), np.float32)
    for e, (closed, idx) in enumerate(EDGES):
        curve = np.clip(edge_curve(np.asarray(points[idx], np.float64), closed), 0, size - 1)
        c0 = np.clip(np.floor(curve.min(0) / 4).astype(int) - 1, 0, h)  # the window, in map cells (x, y)
        c1 = np.clip(np.floor(curve.max(0) / 4).astype(int) + 2, 0, h)
        cells = c1 - c0
        canvas = Image.new("L", tuple(int(v) for v in cells * 16))
        # Input pixel centre p is supersampled pixel 4p + 1.5: a 4-wide PIL line there covers exactly the 4 rows of
        # input pixel p (a half-pixel shift, as for odd widths, would move it a quarter input pixel).
        line = [tuple(v) for v in ((curve - c0 * 4) * 4 + 1.5).tolist()]
        ImageDraw.Draw(canvas).line(line + line[:1] if closed else line, fill=255, width=4)
        window = np.asarray(canvas, np.float32).reshape(cells[1], 16, cells[0], 16).mean(axis=(1, 3)) / 255.0
        out[e, c0[1]:c1[1], c0[0]:c1[0]] = window
    return out


def pixels_to_unit(points: np.ndarray, size: int) -> np.ndarray:
    """Crop pixels -> STAR's [-1, 1] coordinates (pixel p -> (2p + 1) / S - 1)."""
    return np.clip((points * 2 + 1) / size - 1, -1, 1).astype(np.float32)


def prepare_detector_batch(batch: dict, size: int, augment: bool, targets: bool = True, texture: bool = True) -> dict:
    """Decode, crop (and with `augment`, flip and move; with `texture` too, texture-augment) a batch of shard rows;
    with `targets`, also build the point and edge maps the losses need (validation needs only the landmarks: the
    maps are 1.3 MB a face at 256 px)."""
    rng = np.random.default_rng() if augment else None
    crops, pts = [], []
    for key, data, points in zip(batch["key"], batch["image"], landmarks_from_rows(batch["landmarks"])):
        crop, moved, _ = face_crop(decode_image(data, str(key)), points, size, rng)
        crops.append(texture_augment(crop, rng) if rng is not None and texture else crop)
        pts.append(moved)
    pts = np.stack(pts)
    out = {"image": np.stack(crops), "landmarks": pixels_to_unit(pts, size)}
    if targets:
        out["pointmaps"] = np.stack([point_maps(p, size) for p in pts])
        out["edgemaps"] = np.stack([edge_maps(p, size) for p in pts])
    return out

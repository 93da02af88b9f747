"""A built-in procedural face source: random 68-point faces drawn in several visual styles.

The image is drawn *from* the landmarks, so every (image, landmarks) pair is exact. It stands in for real data in the
demo and the tests, and is varied enough (shape, expression, roll, placement, style) for the later stages to show
real learning on a CPU.
"""

from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mdland.data.shards import Face, ShardWriter, encode_image
from mdland.landmarks.render import SHAPE_SHIFT
from mdland.landmarks.scheme import FLIP_PERMUTATION, PARTS

STYLES = ("line_art", "flat_cartoon", "painted")


def _mean_face() -> np.ndarray:
    """A frontal mean face in face units: x right, y down, the nose bridge on x = 0, chin at y = 0.85."""
    p = np.zeros((68, 2))
    alpha = np.deg2rad(185 - np.arange(17) * 190 / 16)
    p[0:17] = np.stack([0.72 * np.cos(alpha), 0.85 * np.sin(alpha)], axis=1)
    k = np.arange(5)
    p[17:22] = np.stack([-0.62 + 0.125 * k, -0.42 - 0.08 * np.sin(np.pi * k / 4)], axis=1)
    p[27:31] = np.stack([np.zeros(4), np.linspace(-0.25, 0.12, 4)], axis=1)
    p[31:36] = [[-0.16, 0.20], [-0.08, 0.23], [0.0, 0.25], [0.08, 0.23], [0.16, 0.20]]
    p[36:42] = [[-0.49, -0.20], [-0.40, -0.26], [-0.30, -0.26], [-0.21, -0.20], [-0.30, -0.15], [-0.40, -0.15]]
    p[48:60] = [[-0.30, 0.48], [-0.20, 0.42], [-0.08, 0.39], [0.0, 0.41], [0.08, 0.39], [0.20, 0.42],
                [0.30, 0.48], [0.20, 0.56], [0.10, 0.59], [0.0, 0.60], [-0.10, 0.59], [-0.20, 0.56]]
    p[60:68] = [[-0.25, 0.48], [-0.10, 0.45], [0.0, 0.46], [0.10, 0.45], [0.25, 0.48], [0.10, 0.51],
                [0.0, 0.52], [-0.10, 0.51]]
    # The right brow and eye mirror the left ones.
    for i in list(range(17, 22)) + list(range(36, 42)):
        p[FLIP_PERMUTATION[i]] = [-p[i, 0], p[i, 1]]
    return p


MEAN_FACE = _mean_face()


def random_landmarks(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A random plausible face in a size x size frame: shape, expression, roll and placement vary."""
    p = MEAN_FACE.copy()
    p[:, 0] *= rng.uniform(0.85, 1.12)
    p[:, 1] *= rng.uniform(0.9, 1.1)
    p[0:17, 0] *= rng.uniform(0.9, 1.1)  # jaw width
    eye_open = rng.uniform(0.5, 1.6)
    for upper, lower in (([37, 38], [40, 41]), ([43, 44], [46, 47])):
        centre = p[upper + lower, 1].mean()
        p[upper + lower, 1] = centre + (p[upper + lower, 1] - centre) * eye_open
    p[17:27, 1] -= rng.uniform(-0.04, 0.08)
    mouth_open = rng.uniform(0.0, 0.12)
    p[[55, 56, 57, 58, 59, 65, 66, 67], 1] += mouth_open
    mouth = list(PARTS["mouth_outer"]) + list(PARTS["mouth_inner"])
    p[mouth, 0] *= rng.uniform(0.8, 1.2)
    p[31:36, 1] += rng.uniform(-0.04, 0.04)
    angle = np.deg2rad(rng.uniform(-15, 15))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    p = (p - [0.0, 0.17]) @ rot.T
    scale = size * rng.uniform(0.30, 0.36)
    centre = size / 2 + rng.uniform(-0.04, 0.04, size=2) * size
    return (p * scale + centre).astype(np.float32)


def _head_outline(p: np.ndarray) -> list[tuple[float, float]]:
    """Jaw plus a forehead arc over the brows, as a closed polygon."""
    ends = p[0], p[16]
    mid = (ends[0] + ends[1]) / 2
    top = p[27] + (p[27] - p[8]) * 0.45
    arc = [tuple(mid + (ends[1] - mid) * np.cos(t) + (top - mid) * np.sin(t)) for t in np.linspace(0, np.pi, 12)]
    return [tuple(q) for q in p[0:17]] + arc[1:-1]


def _poly(p: np.ndarray, idx) -> list[tuple[float, float]]:
    return [tuple(map(float, p[i])) for i in idx]


def draw_face(points: np.ndarray, style: str, size: int = 256, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw a face whose features sit exactly on `points`, in one of STYLES; (size, size, 3) uint8."""
    if style not in STYLES:
        raise ValueError(f"unknown procedural style {style!r}; choose one of {STYLES}")
    rng = rng or np.random.default_rng(0)
    ss = 2  # draw at twice the size and downsample, for anti-aliased edges
    # Pixel-centre points in the supersampled image, moved by PIL's half pixel; odd line widths (see SHAPE_SHIFT).
    p = np.asarray(points, dtype=np.float64) * ss + (ss - 1) / 2 + SHAPE_SHIFT
    lw = max(1, round(size * ss / 110)) | 1
    bg = tuple(int(v) for v in rng.integers(150, 256, 3)) if style != "line_art" else (255, 255, 255)
    image = Image.new("RGB", (size * ss, size * ss), bg)
    d = ImageDraw.Draw(image)
    ink = (20, 20, 20)
    iris = tuple(int(v) for v in rng.integers(20, 140, 3))
    if style == "line_art":
        d.line(_head_outline(p) + [tuple(p[0])], fill=ink, width=lw)
        for part in ("brow_left", "brow_right", "nose_bridge"):
            d.line(_poly(p, PARTS[part]), fill=ink, width=lw)
        d.line(_poly(p, [30, 31, 32, 33, 34, 35, 30]), fill=ink, width=lw)
        for part in ("eye_left", "eye_right", "mouth_outer", "mouth_inner"):
            d.polygon(_poly(p, PARTS[part]), outline=ink, width=lw)
        for eye in ("eye_left", "eye_right"):
            c, r = p[list(PARTS[eye])].mean(0), 0.35 * np.ptp(p[list(PARTS[eye]), 1]) + lw
            d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=ink)
    else:
        skin = tuple(int(v) for v in rng.integers([170, 110, 80], [255, 200, 170]))
        hair = tuple(int(v) for v in rng.integers(0, 120, 3))
        outline = _head_outline(p)
        d.polygon(outline, fill=hair)
        d.polygon([tuple(q) for q in p[0:17]] + _poly(p, [26, 25, 24, 23, 22, 21, 20, 19, 18, 17]), fill=skin)
        d.polygon(outline, outline=ink, width=lw)
        for part in ("brow_left", "brow_right"):
            d.line(_poly(p, PARTS[part]), fill=hair, width=2 * lw + 1)
        for eye in ("eye_left", "eye_right"):
            d.polygon(_poly(p, PARTS[eye]), fill=(250, 250, 250), outline=ink, width=lw)
            idx = list(PARTS[eye])
            c, r = p[idx].mean(0), 0.4 * np.ptp(p[idx, 1]) + lw
            d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=iris)
        d.line(_poly(p, PARTS["nose_bridge"]), fill=ink, width=lw)
        d.line(_poly(p, [31, 32, 33, 34, 35]), fill=ink, width=lw)
        d.polygon(_poly(p, PARTS["mouth_outer"]), fill=(190, 40, 60), outline=ink, width=lw)
        d.polygon(_poly(p, PARTS["mouth_inner"]), fill=(60, 10, 20))
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    if style == "painted":
        image = image.filter(ImageFilter.GaussianBlur(radius=size / 200))
        noise = rng.normal(0, 14, (size // 4, size // 4, 3))
        texture = np.asarray(Image.fromarray(np.uint8(np.clip(noise + 128, 0, 255))).resize((size, size)))
        arr = np.asarray(image, dtype=np.float32) + (texture.astype(np.float32) - 128) + rng.normal(0, 4, (size, size, 3))
        return np.clip(arr, 0, 255).astype(np.uint8)
    return np.asarray(image)


def procedural_faces(
    count: int, seed: int = 0, size: int = 256, styles: tuple[str, ...] = STYLES, start: int = 0
) -> Iterator[Face]:
    """Faces `start` .. `start + count - 1`; face i depends only on (seed, i), so any slice is reproducible."""
    if not styles:
        raise ValueError(f"no procedural style given; choose from {STYLES}")
    for unknown in set(styles) - set(STYLES):
        raise ValueError(f"unknown procedural style {unknown!r}; choose from {STYLES}")
    for i in range(start, start + count):
        rng = np.random.default_rng([seed, i])
        points = random_landmarks(rng, size)
        style = styles[i % len(styles)]
        image = draw_face(points, style, size, rng)
        yield Face(
            image=encode_image(image), landmarks=points, key=f"procedural-{seed}-{i:07d}",
            prompt=f"a portrait of {style.replace('_', ' ')} style", style=style, source="procedural",
            seed=int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0] >> np.uint64(1)),
        )


def write_faces(root: str, count: int, seed: int, size: int, start: int = 0, rows_per_shard: int = 64) -> dict:
    """Procedural faces straight into shards."""
    writer = ShardWriter(root, rows_per_shard, {"source": "procedural", "seed": seed, "size": size})
    for face in procedural_faces(count, seed, size, start=start):
        writer.add(face)
    return writer.close()

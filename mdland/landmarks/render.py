"""Drawing landmarks: the ControlNet condition image, overlays and image grids."""

import numbers

import numpy as np
from PIL import Image, ImageDraw

from mdland.landmarks.scheme import POLYLINES, check_shape

# PIL rasterises at floor(coordinate), as if a pixel spanned [i, i + 1): pixel-centre points move by half a pixel
# so that dots and lines land on their nearest pixels instead of leaning up and left. Only odd-width lines centre on
# a pixel; an even width leans half a pixel whichever way the line's angle says, so every line width here is odd.
SHAPE_SHIFT = 0.5


# One colour per part, far apart in RGB so the condition image tells the parts apart.
PART_COLOURS: dict[str, tuple[int, int, int]] = {
    "jaw": (255, 255, 255),
    "brow_left": (255, 128, 0),
    "brow_right": (255, 255, 0),
    "nose_bridge": (0, 128, 255),
    "nose_lower": (0, 255, 255),
    "eye_left": (0, 255, 0),
    "eye_right": (128, 255, 128),
    "mouth_outer": (255, 0, 0),
    "mouth_inner": (255, 0, 255),
}


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    w, h = (size, size) if isinstance(size, numbers.Integral) else size
    if w <= 0 or h <= 0:
        raise ValueError(f"render size must be positive, got {size}")
    return int(w), int(h)


def render_landmarks(points: np.ndarray, size: int | tuple[int, int] = 256) -> np.ndarray:
    """The condition image: per-part coloured polylines and points on black, (H, W, 3) uint8.

    `points` are 0-based pixel coordinates in an image of `size` (an int for square, or (width, height)).
    Line width and point radius scale with the image so the condition looks alike at every resolution.
    """
    pts = check_shape(points, "render_landmarks")
    w, h = _size(size)
    image = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(image)
    width = 2 * round(min(w, h) / 256) + 1  # 3 pixels at 256
    radius = max(1.0, min(w, h) / 128)
    for part, indices, closed in POLYLINES:
        line = [tuple(map(float, pts[i] + SHAPE_SHIFT)) for i in indices]
        if closed:
            line.append(line[0])
        draw.line(line, fill=PART_COLOURS[part], width=width, joint="curve")
    for part, indices, _ in POLYLINES:
        for i in indices:
            x, y = pts[i] + SHAPE_SHIFT
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=PART_COLOURS[part])
    return np.asarray(image)


def draw_landmarks(
    image: np.ndarray | Image.Image,
    points: np.ndarray,
    colour: tuple[int, int, int] = (0, 255, 0),
    second: np.ndarray | None = None,
    second_colour: tuple[int, int, int] = (255, 0, 0),
) -> np.ndarray:
    """`image` with `points` drawn as dots (and optionally a second set, e.g. ground truth vs prediction)."""
    canvas = Image.fromarray(np.asarray(image)).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    r = max(1.0, min(canvas.size) / 128)
    for pts, col in ((second, second_colour), (points, colour)):
        if pts is None:
            continue
        for x, y in np.asarray(pts, dtype=np.float32) + SHAPE_SHIFT:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=col)
    return np.asarray(canvas)


def image_grid(images: list[np.ndarray], columns: int = 8, pad: int = 2) -> np.ndarray:
    """Tile same-sized-or-smaller RGB images into one grid image (white padding)."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + im.shape[0], x : x + im.shape[1]] = np.asarray(im)[..., :3]
    return grid

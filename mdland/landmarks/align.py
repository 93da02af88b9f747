"""Square face crops, as STAR takes them: a centre and a scale (face size / 200 px) give a similarity transform
onto the `size` x `size` input. The crop's square covers the face box edge to edge: its pixel edges, not the corner
pixels' centres, meet the box's (a 512-pixel image shrunk to 256 takes pixel 0 to -0.25 and 511 to 255.25)."""

import numpy as np
from PIL import Image

from mdland.landmarks.scheme import check_shape

# STAR's scale unit: a face of `scale` is 200 * scale pixels across.
SCALE_UNIT = 200.0


def crop_from_landmarks(points: np.ndarray, margin: float = 1.25) -> tuple[tuple[float, float], float]:
    """(centre, scale) of the landmarks' bounding box, its longer side widened by `margin`."""
    pts = check_shape(points, "crop_from_landmarks")
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    return crop_from_box((*lo, *hi), margin)


def crop_from_box(box: tuple[float, float, float, float], margin: float = 1.0) -> tuple[tuple[float, float], float]:
    """(centre, scale) of a face box (x0, y0, x1, y1), its longer side widened by `margin`."""
    x0, y0, x1, y1 = map(float, box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"degenerate face box ({x0:g}, {y0:g}, {x1:g}, {y1:g}): no width or no height")
    return ((x0 + x1) / 2, (y0 + y1) / 2), max(x1 - x0, y1 - y0) * margin / SCALE_UNIT


MAX_BOX_RATIO = 8.0  # a face box's longer side at most this many times the image's


def check_on_image(points: np.ndarray, shape: tuple[int, ...], where: object) -> None:
    """Refuse landmarks of which half or more lie off the (H, W, ...) image: an annotation of another image, or in
    other units. A face cut by the image's edge keeps most of its points on it."""
    height, width = shape[:2]
    off = int((~((points >= -0.5) & (points <= [width - 0.5, height - 0.5])).all(axis=1)).sum())
    if off >= len(points) / 2:
        raise ValueError(f"{where}: {off} of the {len(points)} landmarks lie off the {width}x{height} image")


def check_face_box(values: list[float] | tuple[float, ...], width: int, height: int,
                   max_ratio: float = MAX_BOX_RATIO) -> tuple[float, float, float, float]:
    """A face box (x0, y0, x1, y1) in pixel-edge coordinates (the whole image is 0, 0, W, H) checked against a
    `width` x `height` image: four finite numbers, sides of 2 pixels or more, overlapping the image, its longer side
    at most `max_ratio` times the image's (the crop of an absurdly large box is one blurred pixel, and past ~1e11 the
    resampling arithmetic overflows). It may reach past the image's edges."""
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer too large for a float (JSON has them)
        numbers = []
    if len(numbers) != 4 or not all(np.isfinite(numbers)):
        raise ValueError(f"expected four finite numbers x0,y0,x1,y1, got {list(values)!r:.80}")
    x0, y0, x1, y1 = numbers
    if x1 - x0 < 2 or y1 - y0 < 2:
        raise ValueError(f"degenerate box {[x0, y0, x1, y1]} (each side at least 2 pixels needed)")
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise ValueError(f"box {[x0, y0, x1, y1]} is outside the {width}x{height} image")
    if max(x1 - x0, y1 - y0) > max_ratio * max(width, height):
        raise ValueError(f"box {[x0, y0, x1, y1]} is over {max_ratio:g}x the {width}x{height} image's longer side")
    return (x0, y0, x1, y1)


def crop_from_edge_box(box: tuple[float, float, float, float]) -> tuple[tuple[float, float], float]:
    """(centre, scale) of the square crop a face box in pixel-edge coordinates asks for (the whole image is
    0, 0, W, H, as face detectors give boxes): its longer side, centred."""
    (cx, cy), scale = crop_from_box(box)
    # Box edges -> the pixel-centre coordinates points and crops use (pixel i spans [i - 0.5, i + 0.5]).
    return (cx - 0.5, cy - 0.5), scale


def crop_matrix(centre: tuple[float, float], scale: float, size: int = 256) -> np.ndarray:
    """3x3 matrix from source pixels to crop pixels: `centre` lands on the crop's centre, `scale` fills it."""
    if scale <= 0:
        raise ValueError(f"crop scale must be positive, got {scale}")
    s = size / (scale * SCALE_UNIT)
    half = (size - 1) / 2.0
    return np.array(
        [[s, 0.0, half - s * centre[0]], [0.0, s, half - s * centre[1]], [0.0, 0.0, 1.0]], dtype=np.float64
    )


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 3x3 affine matrix to (N, 2) points."""
    pts = np.asarray(points, dtype=np.float64)
    return (pts @ matrix[:2, :2].T + matrix[:2, 2]).astype(np.float32)


def warp_image(image: np.ndarray | Image.Image, matrix: np.ndarray, size: int) -> np.ndarray:
    """Resample `image` through `matrix` (source -> output pixels) into a size x size RGB array, black outside."""
    src = (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))).convert("RGB")
    # Shrinking by 2x or more: average f x f blocks first, or the bilinear warp aliases (a 1024 px photo into a
    # 256 crop would keep one pixel in four). Reduced pixel j is centred on source pixel j * f + (f - 1) / 2.
    factor = int(1 / np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))
    if factor >= 2:
        src = src.reduce(factor)
        offset = (factor - 1) / 2
        matrix = matrix @ np.array([[factor, 0.0, offset], [0.0, factor, offset], [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(matrix)
    # PIL samples output pixel (x, y) at its centre (x + 0.5, y + 0.5) in source coordinates shifted the same way,
    # so move the mapping from pixel-centre to PIL's pixel-corner convention.
    shift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    pil = shift @ inv @ np.linalg.inv(shift)
    out = src.transform(
        (size, size), Image.Transform.AFFINE, data=tuple(pil[:2].ravel()), resample=Image.Resampling.BILINEAR
    )
    return np.asarray(out)


def crop_face(
    image: np.ndarray | Image.Image, points: np.ndarray, centre: tuple[float, float], scale: float, size: int = 256
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop a face: (size x size RGB image, landmarks in crop pixels, the 3x3 source->crop matrix)."""
    matrix = crop_matrix(centre, scale, size)
    return warp_image(image, matrix, size), transform_points(points, matrix), matrix


def uncrop_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Map points predicted on a crop back to the source image's pixels."""
    return transform_points(points, np.linalg.inv(matrix))


def resize_points(points: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """Pixel-centre coordinates of an image of (width, height) `from_size` resized to `to_size`: they scale about
    -0.5, the outer edge of the first pixel."""
    scale = np.array([to_size[0] / from_size[0], to_size[1] / from_size[1]])
    return (np.asarray(points) + 0.5) * scale - 0.5

"""The 68-point iBUG / 300W landmark scheme.

Indices are 0-based. "Left" and "right" are from the viewer's side, as in the iBUG annotation guide:
points 36-41 are the eye on the image's left, 42-47 the eye on the image's right.
"""

import numpy as np

NUM_POINTS = 68

GROUPS: dict[str, range] = {
    "jaw": range(0, 17),
    "brows": range(17, 27),
    "nose": range(27, 36),
    "eyes": range(36, 48),
    "mouth": range(48, 68),
}

# Finer parts, used for drawing and by the edits.
PARTS: dict[str, range] = {
    "jaw": range(0, 17),
    "brow_left": range(17, 22),
    "brow_right": range(22, 27),
    "nose_bridge": range(27, 31),
    "nose_lower": range(31, 36),
    "eye_left": range(36, 42),
    "eye_right": range(42, 48),
    "mouth_outer": range(48, 60),
    "mouth_inner": range(60, 68),
}

# (part, closed) for the polylines drawn by render_landmarks; the bridge joins the lower nose at point 30.
POLYLINES: list[tuple[str, list[int], bool]] = [
    ("jaw", list(range(0, 17)), False),
    ("brow_left", list(range(17, 22)), False),
    ("brow_right", list(range(22, 27)), False),
    ("nose_bridge", list(range(27, 31)), False),
    ("nose_lower", [30, 31, 32, 33, 34, 35, 30], False),
    ("eye_left", list(range(36, 42)), True),
    ("eye_right", list(range(42, 48)), True),
    ("mouth_outer", list(range(48, 60)), True),
    ("mouth_inner", list(range(60, 68)), True),
]

# Mirror pairs under a horizontal flip; points on the symmetry axis map to themselves.
_FLIP_PAIRS = (
    [(i, 16 - i) for i in range(8)]
    + [(17 + i, 26 - i) for i in range(5)]
    + [(31, 35), (32, 34)]
    + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
    + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)]
)


def _flip_permutation() -> np.ndarray:
    perm = np.arange(NUM_POINTS)
    for a, b in _FLIP_PAIRS:
        perm[a], perm[b] = b, a
    return perm


FLIP_PERMUTATION: np.ndarray = _flip_permutation()

OUTER_EYE_CORNERS = (36, 45)
LEFT_EYE = list(PARTS["eye_left"])
RIGHT_EYE = list(PARTS["eye_right"])


def flip_landmarks(points: np.ndarray, width: float) -> np.ndarray:
    """Landmarks of the horizontally mirrored image (0-based pixel-centre coordinates)."""
    points = np.asarray(points, dtype=np.float32)
    flipped = points[FLIP_PERMUTATION].copy()
    flipped[:, 0] = (width - 1) - flipped[:, 0]
    return flipped


def eye_centres(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres of the image-left and image-right eyes (mean of each eye's six points)."""
    points = np.asarray(points)
    return points[LEFT_EYE].mean(axis=0), points[RIGHT_EYE].mean(axis=0)


def inter_ocular(points: np.ndarray) -> float:
    """Distance between the outer eye corners (points 36 and 45)."""
    points = np.asarray(points, dtype=np.float64)
    return float(np.linalg.norm(points[OUTER_EYE_CORNERS[0]] - points[OUTER_EYE_CORNERS[1]]))


def check_shape(points: np.ndarray, where: str) -> np.ndarray:
    """`points` as a finite float32 (68, 2) array, or a ValueError naming `where`."""
    arr = np.asarray(points, dtype=np.float32)
    if arr.shape != (NUM_POINTS, 2):
        raise ValueError(f"{where}: expected {NUM_POINTS}x2 landmarks, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = int(np.argwhere(~np.isfinite(arr))[0][0])
        raise ValueError(f"{where}: landmark {bad} is not finite")
    return arr

"""Landmark edits from the paper, used to make new condition images from existing faces.

Each edit is a pure function `edit(points, rng, strength) -> (points, params)`: the random draws come only from
`rng`, displacements scale with `strength` (0 is a no-op, 1 the full range), distances are in units of the face
(inter-ocular distance, eye width) and directions follow the face's own axes, so edits behave alike on any
resolution and head roll. `params` is a JSON-ready record of what was drawn.
"""

from collections.abc import Callable

import numpy as np

from mdland.landmarks.scheme import PARTS, check_shape, inter_ocular

Edit = Callable[[np.ndarray, np.random.Generator, float], tuple[np.ndarray, dict]]


def face_axes(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (right, up) of the face: along the outer eye corners, and perpendicular towards the brows."""
    right = points[45] - points[36]
    right = right / max(float(np.linalg.norm(right)), 1e-6)
    up = np.array([right[1], -right[0]])  # image y grows downwards
    return right, up


def _idx(*parts: str) -> list[int]:
    return [i for p in parts for i in PARTS[p]]


def _start(points: np.ndarray) -> np.ndarray:
    return check_shape(points, "edit").astype(np.float64)


def _done(points: np.ndarray, **params: float | str) -> tuple[np.ndarray, dict]:
    return points.astype(np.float32), {k: (round(v, 6) if isinstance(v, float) else v) for k, v in params.items()}


def edit_chubby(points: np.ndarray, rng: np.random.Generator, strength: float = 1.0):
    """Widen the lower face and cheeks: jaw points move outwards from the face's midline, most at the cheeks."""
    p = _start(points)
    right, _ = face_axes(p)
    amount = strength * rng.uniform(0.06, 0.16)
    centre = p[27:31].mean(axis=0)
    jaw = _idx("jaw")
    lateral = (p[jaw] - centre) @ right
    # Zero at the ears (0, 16), growing down the jaw; the chin sits on the midline so it barely moves.
    weight = np.sin(np.pi * np.arange(17) / 16)
    p[jaw] += (amount * weight * lateral)[:, None] * right
    return _done(p, amount=float(amount))


def edit_linear_transform(points: np.ndarray, rng: np.random.Generator, strength: float = 1.0):
    """A bounded random affine about the face centre: roll within 12 degrees, scale 0.92-1.08 per axis, shear 0.08."""
    p = _start(points)
    angle = np.deg2rad(rng.uniform(-12, 12))
    sx, sy = rng.uniform(0.92, 1.08, size=2)
    shear = rng.uniform(-0.08, 0.08)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    full = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([sx, sy])
    matrix = np.eye(2) + strength * (full - np.eye(2))
    centre = p.mean(axis=0)
    p = (p - centre) @ matrix.T + centre
    # The draws describe the full-strength transform; `matrix` is what was applied (about the landmarks' mean).
    return _done(p, angle_deg=float(np.rad2deg(angle)), scale_x=float(sx), scale_y=float(sy), shear=float(shear),
                 matrix=matrix.round(6).tolist())


def edit_open_eyes(points: np.ndarray, rng: np.random.Generator, strength: float = 1.0):
    """Open both eyes wider: upper lids move up, lower lids down, by a share of the eye's width."""
    p = _start(points)
    _, up = face_axes(p)
    amount = strength * rng.uniform(0.08, 0.25)
    for upper, lower, corners in (([37, 38], [40, 41], (36, 39)), ([43, 44], [46, 47], (42, 45))):
        width = float(np.linalg.norm(p[corners[0]] - p[corners[1]]))
        p[upper] += amount * width * up
        p[lower] -= 0.5 * amount * width * up
    return _done(p, amount=float(amount))


def edit_raise_eyebrows(points: np.ndarray, rng: np.random.Generator, strength: float = 1.0):
    """Raise the left, right or both eyebrows, the middle of the brow the most."""
    p = _start(points)
    _, up = face_axes(p)
    which = str(rng.choice(["left", "right", "both"]))
    amount = strength * rng.uniform(0.08, 0.22) * inter_ocular(p)
    profile = np.array([0.6, 0.85, 1.0, 0.9, 0.7])
    sides = {"left": ["brow_left"], "right": ["brow_right"], "both": ["brow_left", "brow_right"]}[which]
    for side in sides:
        idx = _idx(side)
        prof = profile if side == "brow_left" else profile[::-1]
        p[idx] += (amount * prof)[:, None] * up
    return _done(p, which=which, amount=float(amount / max(inter_ocular(points), 1e-6)))


def edit_stretch_nostrils(points: np.ndarray, rng: np.random.Generator, strength: float = 1.0):
    """Widen the nostrils: lower-nose points move outwards from the nose tip (point 33)."""
    p = _start(points)
    right, _ = face_axes(p)
    amount = strength * rng.uniform(0.15, 0.45)
    idx = [31, 32, 34, 35]
    lateral = (p[idx] - p[33]) @ right
    p[idx] += (amount * lateral)[:, None] * right
    return _done(p, amount=float(amount))


def _shift(p: np.ndarray, moves: list[tuple[list[int], float, float]]) -> None:
    """Move each group of points by (dx, dy) inter-ocular distances along the face's axes, all measured before any
    move (moving one eye first would turn the axes and stretch the distance for the other)."""
    right, up = face_axes(p)
    iod = inter_ocular(p)
    for idx, dx, dy in moves:
        p[idx] += iod * (dx * right + dy * up)


def edit_shift_eyes(points: np.ndarray, rng: np.random.Generator, strength: float = 1.0):
    """Move the eyes: apart or together, and up or down, in units of the inter-ocular distance."""
    p = _start(points)
    apart, dy = strength * rng.uniform(-0.06, 0.06), strength * rng.uniform(-0.06, 0.06)
    _shift(p, [(_idx("eye_left"), -apart, dy), (_idx("eye_right"), apart, dy)])
    return _done(p, apart=float(apart), up=float(dy))


def edit_shift_nose(points: np.ndarray, rng: np.random.Generator, strength: float = 1.0):
    """Move the whole nose sideways and up or down."""
    p = _start(points)
    dx, dy = strength * rng.uniform(-0.08, 0.08), strength * rng.uniform(-0.06, 0.06)
    _shift(p, [(_idx("nose_bridge", "nose_lower"), dx, dy)])
    return _done(p, right=float(dx), up=float(dy))


def edit_shift_mouth(points: np.ndarray, rng: np.random.Generator, strength: float = 1.0):
    """Move the whole mouth sideways and up or down."""
    p = _start(points)
    dx, dy = strength * rng.uniform(-0.1, 0.1), strength * rng.uniform(-0.1, 0.1)
    _shift(p, [(_idx("mouth_outer", "mouth_inner"), dx, dy)])
    return _done(p, right=float(dx), up=float(dy))


EDITS: dict[str, Edit] = {
    "chubby": edit_chubby,
    "linear_transform": edit_linear_transform,
    "open_eyes": edit_open_eyes,
    "raise_eyebrows": edit_raise_eyebrows,
    "stretch_nostrils": edit_stretch_nostrils,
    "shift_eyes": edit_shift_eyes,
    "shift_nose": edit_shift_nose,
    "shift_mouth": edit_shift_mouth,
}

# Which points each edit may move (the rest must stay put).
EDIT_MOVES: dict[str, list[int]] = {
    "chubby": _idx("jaw"),
    "linear_transform": list(range(68)),
    "open_eyes": [37, 38, 40, 41, 43, 44, 46, 47],
    "raise_eyebrows": _idx("brow_left", "brow_right"),
    "stretch_nostrils": [31, 32, 34, 35],
    "shift_eyes": _idx("eye_left", "eye_right"),
    "shift_nose": _idx("nose_bridge", "nose_lower"),
    "shift_mouth": _idx("mouth_outer", "mouth_inner"),
}


def sample_edits(
    points: np.ndarray, rng: np.random.Generator, k: int = 2, strength: float = 1.0
) -> tuple[np.ndarray, list[dict]]:
    """Apply `k` distinct random edits in turn; returns the points and [{"name", "params"}, ...] in order."""
    if not 0 < k <= len(EDITS):
        raise ValueError(f"k must be between 1 and {len(EDITS)}, got {k}")
    names = rng.choice(sorted(EDITS), size=k, replace=False)
    records = []
    for name in names:
        points, params = EDITS[str(name)](points, rng, strength)
        records.append({"name": str(name), "params": params})
    return points, records


def fit_in_frame(points: np.ndarray, size: int, margin: float = 2.0) -> np.ndarray:
    """Shrink (about the face centre) and move the face just enough to lie in [margin, size - 1 - margin]."""
    p = np.asarray(points, dtype=np.float64)
    lo, hi = margin, size - 1 - margin
    if hi <= lo:
        raise ValueError(f"fit_in_frame: a {size}-pixel frame has no room inside a {margin:g}-pixel margin")
    extent = p.max(axis=0) - p.min(axis=0)
    shrink = min(1.0, float(np.min((hi - lo) / np.maximum(extent, 1e-6))))
    centre = (p.max(axis=0) + p.min(axis=0)) / 2
    p = (p - centre) * shrink + centre
    p += np.maximum(lo - p.min(axis=0), 0) - np.maximum(p.max(axis=0) - hi, 0)
    return p.astype(np.float32)

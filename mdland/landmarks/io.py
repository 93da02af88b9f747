"""Readers and writers for landmark annotation files.

Coordinates inside mdland are 0-based pixel-centre coordinates: the centre of the top-left pixel is (0, 0).
- `.pts` (300W, ArtFace) files use the iBUG convention, 1-based (top-left pixel centre is (1, 1)):
  `read_pts` subtracts 1 and `write_pts` adds 1 unless `one_based=False`.
- CariFace-style `.txt` files (68 lines of `x y`) and FFHQ's JSON are taken as 0-based, as they are.
- STAR's annotation TSV stores 0-based coordinates (its loader uses them as is).
Every reader raises ValueError naming the file (and line or row) on bad input; the FFHQ and TSV readers can hand a
bad entry to a callback instead, and go on.
"""

import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mdland.landmarks.scheme import NUM_POINTS, check_shape, eye_centres


def _parse_xy(tokens: list[str], where: str) -> tuple[float, float]:
    if len(tokens) != 2:
        raise ValueError(f"{where}: expected 'x y', got {' '.join(tokens)!r}")
    try:
        x, y = float(tokens[0]), float(tokens[1])
    except ValueError:
        raise ValueError(f"{where}: non-numeric coordinate in {' '.join(tokens)!r}") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ValueError(f"{where}: coordinate is not finite: {' '.join(tokens)!r}")
    return x, y


def _read_text(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: landmark file not found")
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def read_pts(path: str | Path, one_based: bool = True) -> np.ndarray:
    """Read a 68-point iBUG `.pts` file into a (68, 2) float32 array of 0-based coordinates."""
    lines = _read_text(path)
    try:
        open_at = next(i for i, line in enumerate(lines) if line.strip() == "{")
        close_at = next(i for i, line in enumerate(lines) if line.strip() == "}" and i > open_at)
    except StopIteration:
        raise ValueError(f"{path}: not a .pts file (no '{{' ... '}}' block)") from None
    declared = None
    for i, line in enumerate(lines[:open_at]):
        if line.strip().startswith("n_points"):
            try:
                declared = int(line.split(":", 1)[1])
            except (IndexError, ValueError):
                raise ValueError(f"{path}:{i + 1}: bad n_points line {line!r}") from None
    points = [
        _parse_xy(lines[i].split(), f"{path}:{i + 1}")
        for i in range(open_at + 1, close_at)
        if lines[i].strip()
    ]
    if declared is not None and declared != len(points):
        raise ValueError(f"{path}: n_points says {declared} but the file has {len(points)} points")
    if len(points) != NUM_POINTS:
        raise ValueError(f"{path}: expected {NUM_POINTS} points, found {len(points)}")
    arr = np.asarray(points, dtype=np.float32)
    return arr - 1.0 if one_based else arr


def write_pts(path: str | Path, points: np.ndarray, one_based: bool = True) -> None:
    """Write (68, 2) 0-based landmarks as an iBUG `.pts` file."""
    pts = check_shape(points, str(path)).astype(np.float64) + (1.0 if one_based else 0.0)
    body = "\n".join(f"{x:.4f} {y:.4f}" for x, y in pts)
    Path(path).write_text(f"version: 1\nn_points: {NUM_POINTS}\n{{\n{body}\n}}\n", encoding="utf-8")


def read_txt(path: str | Path) -> np.ndarray:
    """Read a CariFace-style landmark file: 68 non-empty lines of `x y` (commas also accepted)."""
    lines = _read_text(path)
    points = [
        _parse_xy(line.replace(",", " ").split(), f"{path}:{i + 1}")
        for i, line in enumerate(lines)
        if line.strip()
    ]
    if len(points) != NUM_POINTS:
        raise ValueError(f"{path}: expected {NUM_POINTS} lines of 'x y', found {len(points)}")
    return np.asarray(points, dtype=np.float32)


def write_txt(path: str | Path, points: np.ndarray) -> None:
    pts = check_shape(points, str(path))
    Path(path).write_text("".join(f"{x:.4f} {y:.4f}\n" for x, y in pts), encoding="utf-8")


FFHQ_VARIANTS = ("image", "in_the_wild")


@dataclass
class FFHQEntry:
    index: str
    file_path: str
    landmarks: np.ndarray


def _raise(message: str) -> None:
    raise ValueError(message)


def read_ffhq_json(path: str | Path, variant: str = "image",
                   bad_entry: Callable[[str], None] = _raise) -> list[FFHQEntry]:
    """Entries of FFHQ's `ffhq-dataset-v2.json`: `variant` picks `image.*` (aligned 1024) or `in_the_wild.*`.
    An entry that does not read is handed to `bad_entry` (its message) and left out; by default it raises."""
    if variant not in FFHQ_VARIANTS:
        raise ValueError(f"unknown FFHQ variant {variant!r}; choose one of {FFHQ_VARIANTS}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: FFHQ metadata file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object of entries keyed by index")
    entries = []
    for key in sorted(data, key=lambda k: int(k) if str(k).isdigit() else str(k)):
        where = f"{path}: entry {key}"
        part = data[key].get(variant) if isinstance(data[key], dict) else None
        try:
            if not isinstance(part, dict) or "face_landmarks" not in part or "file_path" not in part:
                raise ValueError(f"{where}: missing {variant}.file_path or {variant}.face_landmarks")
            try:
                points = np.asarray(part["face_landmarks"], dtype=np.float32)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: {variant}.face_landmarks is not numeric") from None
            entries.append(FFHQEntry(str(key), part["file_path"], check_shape(points, where)))
        except ValueError as e:
            bad_entry(str(e))
    return entries


def write_ffhq_json(path: str | Path, entries: list[FFHQEntry], variant: str = "image") -> None:
    data = {
        e.index: {variant: {"file_path": e.file_path, "face_landmarks": check_shape(e.landmarks, e.index).tolist()}}
        for e in entries
    }
    Path(path).write_text(json.dumps(data, indent=1), encoding="utf-8")


STAR_TSV_HEADER = ["image_path", "landmarks_5pts", "landmarks_target", "scale", "center_w", "center_h"]


@dataclass
class StarRow:
    image_path: str
    landmarks: np.ndarray
    scale: float
    center: tuple[float, float]


def five_points(points: np.ndarray) -> np.ndarray:
    """STAR's 5 alignment points: eye centres, nose tip, mouth corners."""
    left, right = eye_centres(points)
    return np.stack([left, right, points[30], points[48], points[54]]).astype(np.float32)


def _numbers(text: str) -> list[float] | None:
    """Comma-separated numbers, or None when one is not a number."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        return None


def _floats(text: str, count: int, where: str) -> np.ndarray:
    numbers = _numbers(text)
    if numbers is None:
        raise ValueError(f"{where}: non-numeric value in {text[:60]!r}")
    values = np.asarray(numbers, dtype=np.float32)
    if values.size != count:
        raise ValueError(f"{where}: expected {count} comma-separated values, got {values.size}")
    if not np.isfinite(values).all():
        raise ValueError(f"{where}: value is not finite")
    return values


def read_star_tsv(path: str | Path, bad_row: Callable[[str], None] = _raise) -> list[StarRow]:
    """STAR's annotation TSV: image path, 5 points, 68 points, scale (face size / 200), centre x, centre y.

    STAR reads these with a header row (pandas' default): a first row whose landmarks are not numbers is taken for
    one, whatever its names; a file without one is read whole. A row that does not read is handed to `bad_row`
    (its message) and left out; by default it raises.
    """
    lines = _read_text(path)
    rows: list[StarRow] = []
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        fields = line.rstrip("\n").split("\t")
        if i == first and len(fields) > 2 and fields[2] != "" and _numbers(fields[2]) is None:
            continue
        where = f"{path}:{i + 1}"
        try:
            if len(fields) < 6:
                raise ValueError(f"{where}: expected at least 6 tab-separated fields, got {len(fields)}")
            _floats(fields[1], 10, f"{where} (landmarks_5pts)")
            points = _floats(fields[2], 2 * NUM_POINTS, f"{where} (landmarks_target)").reshape(NUM_POINTS, 2)
            scale, cx, cy = (_floats(f, 1, f"{where} ({name})")[0]
                             for f, name in zip(fields[3:6], STAR_TSV_HEADER[3:]))
            if not scale > 0:
                raise ValueError(f"{where}: scale must be positive, got {scale}")
            rows.append(StarRow(fields[0], points, float(scale), (float(cx), float(cy))))
        except ValueError as e:
            bad_row(str(e))
    return rows


def write_star_tsv(path: str | Path, rows: list[StarRow]) -> None:
    def join(a: np.ndarray) -> str:
        return ",".join(f"{v:.4f}" for v in np.asarray(a).ravel())

    out = ["\t".join(STAR_TSV_HEADER)]
    for row in rows:
        pts = check_shape(row.landmarks, row.image_path)
        out.append(
            "\t".join([row.image_path, join(five_points(pts)), join(pts), f"{row.scale:.6f}",
                       f"{row.center[0]:.4f}", f"{row.center[1]:.4f}"])
        )
    Path(path).write_text("\n".join(out) + "\n", encoding="utf-8")


LANDMARK_SUFFIXES = {".pts": read_pts, ".txt": read_txt}


def files_by_key(root: Path, suffixes: set[str]) -> dict[str, Path]:
    """Key -> file for the files under `root` with one of `suffixes`; images and landmark files pair by key. A key is
    the file's name stem, or where files in several folders share a stem (300W's splits reuse image names), its path
    under `root` without the suffix (`lfpw/testset/image_0001`). Two files in one folder with one stem fail, naming
    both."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    shared = Counter(p.stem for p in files)
    found: dict[str, Path] = {}
    for path in files:
        key = path.stem if shared[path.stem] == 1 else path.relative_to(root).with_suffix("").as_posix()
        if key in found:
            raise ValueError(f"{path}: name clashes with {found[key]} (files pair by name stem)")
        found[key] = path
    return found


def read_landmark_file(path: str | Path) -> np.ndarray:
    """Read a `.pts` or `.txt` landmark file by its suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in LANDMARK_SUFFIXES:
        raise ValueError(f"{path}: unknown landmark file type {suffix!r} (expected .pts or .txt)")
    return LANDMARK_SUFFIXES[suffix](path)

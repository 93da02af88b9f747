"""The shard format (DESIGN.md): parquet files of faces plus a `manifest.json`, readable without mdland.

Columns: `key` (unique id), `image` (encoded PNG/JPEG bytes), `landmarks` (68 x [x, y] float32, 0-based pixel
coordinates in the stored image), `prompt`, `style`, `source` (dataset name or "synthetic"), `edits` (edit names),
`edit_params` (JSON list of the edits' parameters), `seed` (int64), `model` (checkpoint id), `alignment`
(optional quality score: detector NME against the landmarks; null when not scored).
"""

import io
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from mdland.data import storage
from mdland.landmarks.scheme import NUM_POINTS, check_shape
from mdland.log import get_logger

log = get_logger(__name__)

FORMAT = "mdland-shards/1"
MANIFEST = "manifest.json"
SWAPPING = ".swapping"  # present while ingest --overwrite replaces a dataset's shards (names the staging folder)

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image", pa.binary()),
        ("landmarks", pa.list_(pa.list_(pa.float32(), 2), NUM_POINTS)),
        ("prompt", pa.string()),
        ("style", pa.string()),
        ("source", pa.string()),
        ("edits", pa.list_(pa.string())),
        ("edit_params", pa.string()),
        ("seed", pa.int64()),
        ("model", pa.string()),
        ("alignment", pa.float32()),
    ]
)


class ShardError(ValueError):
    """A shard or one of its rows is invalid; the message names the shard and row."""


def shard_name(index: int) -> str:
    """The deterministic file name of shard `index`, so re-runs find and skip finished shards."""
    return f"shard-{index:06d}.parquet"


def encode_image(image: np.ndarray | Image.Image, fmt: str = "PNG", quality: int = 95) -> bytes:
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    pil.convert("RGB").save(buf, format=fmt, **({"quality": quality} if fmt.upper() == "JPEG" else {}))
    return buf.getvalue()


def rgb_array(im: Image.Image) -> np.ndarray:
    """An opened image as (H, W, 3) uint8 RGB. 16-bit grey is scaled to 8 bits: PIL's RGB conversion clips it, which
    turns nearly every pixel white."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):
        grey = np.clip(np.asarray(im, dtype=np.float64) / 257, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def decode_image(data: bytes, where: str = "image") -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 RGB, or a ShardError naming `where`."""
    if not data:
        raise ShardError(f"{where}: empty image bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return rgb_array(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ShardError(f"{where}: image does not decode ({e})") from None


@dataclass
class Face:
    """One row of a shard."""

    image: bytes
    landmarks: np.ndarray
    key: str = ""
    prompt: str = ""
    style: str = ""
    source: str = "synthetic"
    edits: list[str] = field(default_factory=list)
    edit_params: list[dict] = field(default_factory=list)
    seed: int = 0
    model: str = ""
    alignment: float | None = None


def faces_to_table(faces: list[Face]) -> pa.Table:
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    for i, f in enumerate(faces):
        columns["landmarks"].append(check_shape(f.landmarks, f"row {i} ({f.key})").tolist())
        columns["edit_params"].append(json.dumps(f.edit_params))
        for name in ("key", "image", "prompt", "style", "source", "edits", "seed", "model", "alignment"):
            columns[name].append(getattr(f, name))
    return pa.table(columns, schema=SCHEMA)


def table_to_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    # Images are already compressed; row groups of <= 256 faces keep readers' memory small.
    pq.write_table(table, sink, row_group_size=256, compression="zstd", use_dictionary=["style", "source", "model"])
    return sink.getvalue().to_pybytes()


def write_shard(uri: str, faces: list[Face] | pa.Table) -> dict:
    """Write one shard atomically; returns its summary (name, rows, per-style/source counts)."""
    table = faces if isinstance(faces, pa.Table) else faces_to_table(faces)
    validate_table(table, uri)
    storage.write_bytes(uri, table_to_bytes(table))
    return summarise_table(table, uri.rstrip("/").split("/")[-1])


def summarise_table(table: pa.Table, name: str) -> dict:
    return {
        "name": name,
        "rows": table.num_rows,
        "styles": dict(Counter(table.column("style").to_pylist())),
        "sources": dict(Counter(table.column("source").to_pylist())),
        "models": sorted(set(table.column("model").to_pylist())),
    }


def check_landmarks(table: pa.Table, name: str) -> None:
    """Every row of the `landmarks` column has all its points, each finite; a ShardError names the row."""
    landmarks = table.column("landmarks").combine_chunks()
    if landmarks.null_count:
        raise ShardError(f"{name}: row {_first_null(landmarks)}: landmarks are missing")
    points = landmarks.flatten()
    if points.null_count:  # a null point would shift every later row's values by one point
        row, point = divmod(_first_null(points), NUM_POINTS)
        raise ShardError(f"{name}: row {row}: landmark {point} is missing")
    values = points.flatten().to_numpy(zero_copy_only=False)  # null coordinates come out as NaN
    if not np.isfinite(values).all():
        bad = int(np.argmax(~np.isfinite(values))) // (NUM_POINTS * 2)
        raise ShardError(f"{name}: row {bad}: landmarks are not finite")


def validate_table(table: pa.Table, name: str, decode: bool = False) -> None:
    """Check columns and every row; a ShardError names the shard, the row and the field."""
    missing = [c for c in SCHEMA.names if c not in table.column_names]
    if missing:
        raise ShardError(f"{name}: missing column(s) {missing}")
    for col in SCHEMA.names:
        if not table.schema.field(col).type.equals(SCHEMA.field(col).type):
            raise ShardError(f"{name}: column {col!r} has type {table.schema.field(col).type}, "
                             f"expected {SCHEMA.field(col).type}")
    check_landmarks(table, name)
    for col in ("image", "seed", "key", "style", "source", "model"):
        arr = table.column(col).combine_chunks()
        if arr.null_count:
            raise ShardError(f"{name}: row {_first_null(arr)}: {col} is missing")
    for row, data in enumerate(table.column("image").to_pylist() if decode else []):
        decode_image(data, f"{name}: row {row}")
    for row, text in enumerate(table.column("edit_params").to_pylist()):
        try:
            json.loads(text or "[]")
        except json.JSONDecodeError:
            raise ShardError(f"{name}: row {row}: edit_params is not JSON") from None


def _first_null(arr: pa.Array) -> int:
    return int(np.argmax(arr.is_null().to_numpy(zero_copy_only=False)))


def read_shard(uri: str, validate: bool = True, decode: bool = False) -> pa.Table:
    """Read a shard; with `validate`, check every row (and with `decode`, that every image decodes)."""
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    except pa.ArrowInvalid as e:
        raise ShardError(f"{uri}: not a readable parquet shard ({e})") from None
    if validate:
        validate_table(table, uri, decode=decode)
    return table


def landmarks_from_rows(rows) -> np.ndarray:
    """(B, 68, 2) float32 from a batch's landmarks column, however it arrives: nested lists, object arrays of
    per-point arrays (Ray Data, pandas) or a (B, 68, 2) array."""
    return np.asarray([np.stack([np.asarray(p, dtype=np.float32) for p in face]) for face in rows], dtype=np.float32)


def landmarks_array(table: pa.Table) -> np.ndarray:
    """The `landmarks` column as an (N, 68, 2) float32 array."""
    flat = table.column("landmarks").combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, NUM_POINTS, 2).astype(np.float32)


def write_manifest(root: str, shards: list[dict], config: dict | None = None, **extra) -> dict:
    """Write `root/manifest.json` listing the shards, total and per-style/source counts, and the config."""
    styles: Counter = Counter()
    sources: Counter = Counter()
    models: set = set()
    for s in shards:
        styles.update(s["styles"])
        sources.update(s["sources"])
        models.update(s["models"])
    manifest = {
        "format": FORMAT,
        "count": sum(s["rows"] for s in shards),
        "styles": dict(sorted(styles.items())),
        "sources": dict(sorted(sources.items())),
        "models": sorted(models),
        "shards": sorted(shards, key=lambda s: s["name"]),
        "config": config or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    storage.write_bytes(storage.join(root, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def read_manifest(root: str) -> dict:
    uri = storage.join(root, MANIFEST)
    try:
        manifest = json.loads(storage.read_bytes(uri))
    except json.JSONDecodeError as e:
        raise ShardError(f"{uri}: invalid JSON ({e.msg})") from None
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{uri}: not an mdland manifest (format {manifest.get('format')!r})")
    return manifest


def shard_uris(root: str) -> list[str]:
    """The dataset's shards: from its manifest, or every `*.parquet` under `root` when there is none."""
    if storage.exists(storage.join(root, SWAPPING)):
        raise ShardError(f"{root}: an `ingest --overwrite` was cut short while swapping in a new set, so old and new "
                         "shards are mixed; run that ingest again")
    if storage.exists(storage.join(root, MANIFEST)):
        return [storage.join(root, s["name"]) for s in read_manifest(root)["shards"]]
    uris = storage.list_files(root, ".parquet")
    if not uris and not storage.list_files(root) and not storage.list_folders(root):
        raise ShardError(f"{root}: not found (no shard dataset there)")
    if not uris:
        raise ShardError(f"{root}: no shards (no manifest.json and no .parquet files); `mdland ingest` makes a "
                         "dataset of a folder of annotated images (evaluate, evaluate-preds and render read one as "
                         "it is, with --format)")
    log.warning("%s: no manifest.json, reading its %d .parquet file(s); a set mdland wrote without one is incomplete",
                root, len(uris))
    return uris


def read_dataset(root: str, validate: bool = True) -> pa.Table:
    """All shards of a dataset as one table (an empty one with the shard schema when the set has no shards)."""
    tables = [read_shard(u, validate=validate) for u in shard_uris(root)]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def read_shard_columns(uri: str, columns: list[str]) -> pa.Table:
    """Only `columns` of one shard (parquet reads no other column's bytes); landmarks checked."""
    fs, path = storage.filesystem(uri)
    try:
        table = pq.read_table(path, filesystem=fs, columns=columns)
    except (pa.ArrowInvalid, KeyError) as e:
        raise ShardError(f"{uri}: cannot read columns {columns} ({e})") from None
    if "landmarks" in columns:
        check_landmarks(table, uri)
    return table


def read_columns(root: str, columns: list[str]) -> pa.Table:
    """Only `columns` of every shard of a dataset."""
    tables = [read_shard_columns(uri, columns) for uri in shard_uris(root)]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table().select(columns)


def first_image_size(root: str) -> tuple[int, int]:
    """(width, height) of a dataset's first image, reading only the first non-empty row group's images."""
    for uri in shard_uris(root):
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            shard = pq.ParquetFile(f)
            images = next((shard.read_row_group(g, columns=["image"]).column("image")
                           for g in range(shard.num_row_groups) if shard.metadata.row_group(g).num_rows), None)
        if images is not None:
            image = decode_image(images[0].as_py(), uri)
            return image.shape[1], image.shape[0]
    raise ShardError(f"{root}: no faces")


class ShardWriter:
    """Collects faces and writes them as numbered shards of `rows_per_shard` rows under `root`.

    `close()` writes the last partial shard and then the manifest. Shards are written atomically, one at a time, so
    an interrupted writer leaves only whole shards behind and no manifest (the set is incomplete).
    """

    def __init__(self, root: str, rows_per_shard: int = 1000, config: dict | None = None):
        if rows_per_shard <= 0:
            raise ValueError(f"rows_per_shard must be positive, got {rows_per_shard}")
        self.root, self.rows_per_shard, self.config = root, rows_per_shard, config
        self.pending: list[Face] = []
        self.written: list[dict] = []

    def add(self, face: Face) -> None:
        self.pending.append(face)
        if len(self.pending) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            uri = storage.join(self.root, shard_name(len(self.written)))
            self.written.append(write_shard(uri, self.pending))
            self.pending = []

    def close(self, **extra) -> dict:
        self.flush()
        return write_manifest(self.root, self.written, self.config, **extra)

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mdland.data import storage
from mdland.data.procedural import procedural_faces
from mdland.data.shards import (
    Face, ShardError, ShardWriter, decode_image, faces_to_table, first_image_size, landmarks_array, read_columns,
    read_dataset, read_manifest, read_shard, shard_name, write_shard,
)


def some_faces(n, start=0):
    return list(procedural_faces(n, seed=3, size=64, start=start))


def test_shard_round_trip_readable_without_mdland(storage_root):
    faces = some_faces(5)
    faces[1].edits, faces[1].edit_params = ["chubby", "open_eyes"], [{"amount": 0.1}, {"amount": 0.2}]
    faces[2].alignment = 0.031
    uri = storage.join(storage_root, shard_name(0))
    summary = write_shard(uri, faces)
    assert summary["rows"] == 5 and sum(summary["styles"].values()) == 5
    table = read_shard(uri, decode=True)
    np.testing.assert_array_equal(landmarks_array(table), np.stack([f.landmarks for f in faces]))
    # Plain pyarrow and pandas read it: nested 68x2 landmarks, bytes images.
    plain = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    df = plain.to_pandas()
    assert list(df.columns)[:3] == ["key", "image", "landmarks"]
    assert np.stack(df.landmarks[0]).shape == (68, 2)
    assert df.edits[1].tolist() == ["chubby", "open_eyes"] and json.loads(df.edit_params[1])[1] == {"amount": 0.2}
    assert pd.isna(df.alignment[0]) and df.alignment[2] == pytest.approx(0.031)
    assert decode_image(df.image[0]).shape == (64, 64, 3) and df.seed.dtype == np.int64


def test_bad_rows_are_named(tmp_path):
    faces = some_faces(3)
    table = faces_to_table(faces)
    lm = landmarks_array(table)
    lm[2, 10, 1] = np.nan
    bad = table.set_column(2, "landmarks", pa.array(lm.tolist(), type=table.schema.field("landmarks").type))
    with pytest.raises(ShardError, match=r"bad.parquet: row 2: landmarks are not finite"):
        write_shard(str(tmp_path / "bad.parquet"), bad)
    assert not (tmp_path / "bad.parquet").exists()
    nested = lm.tolist()
    nested[2][7] = None  # a point, not a coordinate, missing: later rows' values would shift by one point
    bad = table.set_column(2, "landmarks", pa.array(nested, type=table.schema.field("landmarks").type))
    with pytest.raises(ShardError, match=r"bad.parquet: row 2: landmark 7 is missing"):
        write_shard(str(tmp_path / "bad.parquet"), bad)
    nested[2][7], nested[1][3] = [1.0, 1.0], [1.0, None]
    bad = table.set_column(2, "landmarks", pa.array(nested, type=table.schema.field("landmarks").type))
    with pytest.raises(ShardError, match=r"bad.parquet: row 1: landmarks are not finite"):
        write_shard(str(tmp_path / "bad.parquet"), bad)
    style = table.schema.get_field_index("style")
    unstyled = table.set_column(style, "style", pa.array(["a", None, "c"], type=table.schema.field("style").type))
    with pytest.raises(ShardError, match=r"unstyled.parquet: row 1: style is missing"):  # the manifest counts styles
        write_shard(str(tmp_path / "unstyled.parquet"), unstyled)
    faces[1].image = b"not an image"
    uri = str(tmp_path / "s.parquet")
    write_shard(uri, faces)
    with pytest.raises(ShardError, match=r"s.parquet: row 1: image does not decode"):
        read_shard(uri, decode=True)
    pq.write_table(table.drop_columns(["seed"]), tmp_path / "old.parquet")
    with pytest.raises(ShardError, match=r"missing column\(s\) \['seed'\]"):
        read_shard(str(tmp_path / "old.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"PAR1junk")
    with pytest.raises(ShardError, match="junk.parquet: not a readable parquet shard"):
        read_shard(str(tmp_path / "junk.parquet"))
    with pytest.raises(ValueError, match=r"row 0 \(k\): expected 68x2"):
        faces_to_table([Face(image=b"x", landmarks=np.zeros((5, 2)), key="k")])


def test_shard_writer_and_manifest(storage_root):
    writer = ShardWriter(storage_root, rows_per_shard=4, config={"why": "test"})
    for f in some_faces(10):
        writer.add(f)
    manifest = writer.close()
    assert [s["name"] for s in manifest["shards"]] == [shard_name(i) for i in range(3)]
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["count"] == 10 and sum(manifest["styles"].values()) == 10
    assert manifest["sources"] == {"procedural": 10} and manifest["config"] == {"why": "test"}
    assert read_manifest(storage_root)["count"] == 10
    table = read_dataset(storage_root)
    assert table.column("key").to_pylist() == [f.key for f in some_faces(10)]


def test_interrupted_writer_leaves_whole_shards_and_no_manifest(tmp_path):
    root = str(tmp_path / "ds")
    writer = ShardWriter(root, rows_per_shard=3)
    with pytest.raises(ValueError):
        for i, f in enumerate(some_faces(8)):
            if i == 7:
                f.landmarks = np.zeros((3, 2))  # a bad face arrives mid-way
            writer.add(f)
        writer.close()
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [shard_name(0), shard_name(1)]
    assert read_dataset(root).num_rows == 6  # the finished shards are whole and readable


def test_reading_some_columns_only(storage_root, tmp_path):
    writer = ShardWriter(storage_root, rows_per_shard=4)
    for f in some_faces(6):
        writer.add(f)
    writer.close()
    table = read_columns(storage_root, ["landmarks", "style"])
    assert table.column_names == ["landmarks", "style"] and table.num_rows == 6
    np.testing.assert_array_equal(landmarks_array(table), landmarks_array(read_dataset(storage_root)))
    assert first_image_size(storage_root) == (64, 64)
    # Bad landmarks are named even when only that column is read.
    bad = faces_to_table(some_faces(2))
    lm = landmarks_array(bad)
    lm[1, 3, 0] = np.inf
    bad = bad.set_column(2, "landmarks", pa.array(lm.tolist(), type=bad.schema.field("landmarks").type))
    (tmp_path / "bad").mkdir()
    pq.write_table(faces_to_table(some_faces(3)), tmp_path / "bad" / "shard-000000.parquet")
    pq.write_table(bad, tmp_path / "bad" / "shard-000001.parquet")
    with pytest.raises(ShardError, match="shard-000001.parquet: row 1: landmarks are not finite"):
        read_columns(str(tmp_path / "bad"), ["landmarks"])
    nested = landmarks_array(faces_to_table(some_faces(2))).tolist()
    nested[1][5] = None  # a missing point: dropped by flattening, it used to surface as a reshape error
    bad = bad.set_column(2, "landmarks", pa.array(nested, type=bad.schema.field("landmarks").type))
    pq.write_table(bad, tmp_path / "bad" / "shard-000001.parquet")
    with pytest.raises(ShardError, match="shard-000001.parquet: row 1: landmark 5 is missing"):
        read_columns(str(tmp_path / "bad"), ["landmarks"])
    # An image size comes from the first shard with a face in it (a filtered set may have empty ones).
    (tmp_path / "sparse").mkdir()
    pq.write_table(faces_to_table(some_faces(2)).slice(0, 0), tmp_path / "sparse" / "shard-000000.parquet")
    pq.write_table(faces_to_table(some_faces(2)), tmp_path / "sparse" / "shard-000001.parquet")
    assert first_image_size(str(tmp_path / "sparse")) == (64, 64)
    (tmp_path / "none").mkdir()
    pq.write_table(faces_to_table(some_faces(2)).slice(0, 0), tmp_path / "none" / "shard-000000.parquet")
    with pytest.raises(ShardError, match="none: no faces"):
        first_image_size(str(tmp_path / "none"))

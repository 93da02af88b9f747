import json

import numpy as np
import pytest
from PIL import Image

from mdland.data import storage
from mdland.data.ingest import ingest
from mdland.data.procedural import draw_face, random_landmarks
from mdland.data.shards import decode_image, landmarks_array, read_dataset
from mdland.landmarks.align import crop_from_landmarks
from mdland.landmarks.io import FFHQEntry, StarRow, write_ffhq_json, write_pts, write_star_tsv, write_txt

MARK = 30  # the nose tip carries a pure-red marker, to check that points and pixels move together


def make_faces(n=3):
    """Faces drawn at 200 px, pasted at an offset into 320x260 canvases, a red marker on the nose tip."""
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        points = random_landmarks(rng, 200)
        canvas = np.full((260, 320, 3), 90, np.uint8)
        canvas[40:240, 70:270] = draw_face(points, "flat_cartoon", 200, rng)
        points = points + [70, 40]
        x, y = np.round(points[MARK]).astype(int)
        canvas[y - 1 : y + 2, x - 1 : x + 2] = [255, 0, 0]
        points[MARK] = [x, y]
        out.append((f"face{i}", canvas, points.astype(np.float32)))
    return out


def artface_folder(tmp_path, n: int, points: bool = True):
    """`make_faces(n)` saved as PNGs in tmp_path/src, each with its .pts unless `points` is off; (src, faces)."""
    src = tmp_path / "src"
    src.mkdir()
    faces = make_faces(n)
    for name, image, pts in faces:
        Image.fromarray(image).save(src / f"{name}.png")
        if points:
            write_pts(src / f"{name}.pts", pts)
    return src, faces


def check_marker(manifest, dest, size, count):
    assert manifest["count"] == count
    table = read_dataset(dest)
    for data, pts in zip(table.column("image").to_pylist(), landmarks_array(table)):
        image = decode_image(data).astype(float)
        assert image.shape == (size, size, 3)
        red = np.clip(image[..., 0] - image[..., 1:].max(-1), 0, None)
        red[red < 150] = 0
        ys, xs = np.mgrid[:size, :size]
        centre = np.array([(red * xs).sum() / red.sum(), (red * ys).sum() / red.sum()])
        np.testing.assert_allclose(centre, pts[MARK], atol=0.6)
        assert (pts > 0).all() and (pts < size - 1).all()


@pytest.mark.parametrize("fmt", ["artface", "cariface", "folder"])
def test_sidecar_formats(tmp_path, storage_root, fmt):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "landmarks").mkdir()
    for i, (name, image, points) in enumerate(make_faces()):
        Image.fromarray(image).save(src / "images" / f"{name}.{'jpg' if i == 2 else 'png'}", quality=98)
        if fmt == "artface" or (fmt == "folder" and i == 0):
            write_pts(src / "landmarks" / f"{name}.pts", points)
        else:
            write_txt(src / "landmarks" / f"{name}.txt", points)
    # Datasets ship text files that are not landmarks: they have no image and are ignored.
    (src / "README.txt").write_text("CariFace test split\nlandmarks in landmarks/\n")
    (src / "landmarks" / "list.txt").write_text("".join(f"{n}\n" for n, _, _ in make_faces()))
    dest = storage.join(storage_root, fmt)
    manifest = ingest(fmt, src, dest, size=128, rows_per_shard=2)
    assert len(manifest["shards"]) == 2 and manifest["sources"] == {fmt: 3}
    check_marker(manifest, dest, 128, 3)


def test_ffhq(tmp_path):
    src = tmp_path / "ffhq"
    entries = []
    for i, (name, image, points) in enumerate(make_faces(2)):
        rel = f"images1024x1024/00000/{i:05d}.png"
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(src / rel)
        entries.append(FFHQEntry(str(i), rel, points))
    write_ffhq_json(src / "ffhq-dataset-v2.json", entries)
    dest = str(tmp_path / "out")
    check_marker(ingest("ffhq", src, dest, size=256), dest, 256, 2)
    # A bad entry fails naming it, or with skip_bad is left out and named in the manifest.
    meta = json.loads((src / "ffhq-dataset-v2.json").read_text())
    meta["1"]["image"]["face_landmarks"] = meta["1"]["image"]["face_landmarks"][:60]
    (src / "ffhq-dataset-v2.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="entry 1: expected 68x2 landmarks"):
        ingest("ffhq", src, str(tmp_path / "bad"))
    manifest = ingest("ffhq", src, str(tmp_path / "bad"), skip_bad=True)
    assert manifest["count"] == 1 and len(manifest["skipped"]) == 1 and "entry 1: " in manifest["skipped"][0]


def test_star_tsv_uses_its_own_crop(tmp_path):
    rows = []
    for name, image, points in make_faces(2):
        Image.fromarray(image).save(tmp_path / f"{name}.png")
        centre, scale = crop_from_landmarks(points, margin=1.6)
        rows.append(StarRow(f"{name}.png", points, scale, centre))
    write_star_tsv(tmp_path / "test.tsv", rows)
    dest = str(tmp_path / "out")
    manifest = ingest("star-tsv", tmp_path / "test.tsv", dest, size=128)
    check_marker(manifest, dest, 128, 2)
    pts = landmarks_array(read_dataset(dest))
    # margin 1.6 around the landmarks: the face spans 128 / 1.6 = 80 px along its longer side.
    assert np.ptp(pts[0], axis=0).max() == pytest.approx(80, abs=0.5)

    # STAR's own TSVs name images under their rawImages folder (WFLW's test set on a network share), some with
    # Windows separators: read as STAR reads them.
    (tmp_path / "300W").mkdir()
    for i, row in enumerate(rows):
        (tmp_path / row.image_path).rename(tmp_path / "300W" / row.image_path)
        row.image_path = (".\\rawImages\\300W\\" if i == 0 else "//share/wflw/rawImages/300W/") + row.image_path
    write_star_tsv(tmp_path / "star.tsv", rows)
    manifest = ingest("star-tsv", tmp_path / "star.tsv", str(tmp_path / "star"), size=128)
    assert manifest["count"] == 2
    assert read_dataset(str(tmp_path / "star")).column("key").to_pylist() == ["face0-0", "face1-1"]
    # A bad row fails naming its line, or with skip_bad is left out and named in the manifest.
    lines = (tmp_path / "star.tsv").read_text().splitlines()
    lines[1] = lines[1].replace("\t", "\tnot-a-number,", 2)
    (tmp_path / "star.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="star.tsv:2 .*non-numeric value"):
        ingest("star-tsv", tmp_path / "star.tsv", str(tmp_path / "bad"), size=128)
    manifest = ingest("star-tsv", tmp_path / "star.tsv", str(tmp_path / "bad"), size=128, skip_bad=True)
    assert manifest["count"] == 1 and manifest["skipped"][0].startswith(f"{tmp_path / 'star.tsv'}:2 ")
    assert read_dataset(str(tmp_path / "bad")).column("key").to_pylist() == ["face1-0"]


def test_bad_inputs_fail_by_name_or_are_skipped(tmp_path):
    src, faces = artface_folder(tmp_path, 3, points=False)
    write_pts(src / "face0.pts", faces[0][2])
    (src / "face1.pts").write_text("version: 1\nn_points: 68\n{\n" + "1 2\n" * 60 + "}\n")
    dest = str(tmp_path / "out")
    with pytest.raises(ValueError, match="face1.pts: n_points says 68 but the file has 60"):
        ingest("artface", src, dest)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.parquet"))
    write_pts(src / "face1.pts", faces[1][2])
    with pytest.raises(ValueError, match="face2.png: image without a landmark file"):
        ingest("artface", src, dest)
    write_pts(src / "face2.pts", faces[2][2])
    (src / "face2.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    with pytest.raises(ValueError, match="face2.png: unreadable image"):
        ingest("artface", src, dest, rows_per_shard=1)
    # A new dataset that fails two shards in leaves no shards that readers would take for a set.
    assert not any((tmp_path / "out").glob("*.parquet"))
    ingest("artface", src, dest, skip_bad=True, overwrite=True, rows_per_shard=1)
    assert len(list((tmp_path / "out").glob("*.parquet"))) == 2
    manifest = ingest("artface", src, dest, skip_bad=True, overwrite=True)
    assert manifest["count"] == 2 and len(manifest["skipped"]) == 1
    assert manifest["skipped"][0].startswith(f"{src / 'face2.png'}: unreadable image")
    assert len(list((tmp_path / "out").glob("*.parquet"))) == 1  # the replaced dataset's extra shard is gone
    with pytest.raises(ValueError, match="already holds a dataset"):
        ingest("artface", src, dest)
    with pytest.raises(ValueError, match="unknown ingest format"):
        ingest("wflw", src, dest, overwrite=True)
    with pytest.raises(ValueError, match="source not found"):
        ingest("artface", tmp_path / "nowhere", dest, overwrite=True)
    with pytest.raises(ValueError, match="source not found"):  # and no empty folder left where it would go
        ingest("artface", tmp_path / "nowhere", str(tmp_path / "new" / "set"))
    assert not (tmp_path / "new").exists()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["count"] == 2
    # A replacement that fails on its third face, two shards in, leaves the old dataset exactly as it was.
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(ValueError, match="face2.png: unreadable image"):
        ingest("artface", src, dest, overwrite=True, rows_per_shard=1)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_a_domain_gets_its_style_and_prompt(tmp_path):
    src, _ = artface_folder(tmp_path, 2)
    ingest("artface", src, str(tmp_path / "cari"), size=64, style="caricature")
    table = read_dataset(str(tmp_path / "cari"))
    assert table.column("style").to_pylist() == ["caricature"] * 2
    assert table.column("prompt").to_pylist() == ["a portrait of caricature style"] * 2
    ingest("artface", src, str(tmp_path / "own"), size=64, style="ukiyo-e", prompt="a woodblock print portrait")
    assert set(read_dataset(str(tmp_path / "own")).column("prompt").to_pylist()) == {"a woodblock print portrait"}
    with pytest.raises(ValueError, match="'ukiyo-e' is not one of the shipped styles"):
        ingest("artface", src, str(tmp_path / "bad"), size=64, style="ukiyo-e")
    assert not storage.exists(str(tmp_path / "bad" / "manifest.json"))
    ingest("artface", src, str(tmp_path / "plain"), size=64)
    assert set(read_dataset(str(tmp_path / "plain")).column("prompt").to_pylist()) == {""}


def test_degenerate_landmarks_are_named_and_skippable(tmp_path):
    src, faces = artface_folder(tmp_path, 2, points=False)
    write_pts(src / "face0.pts", faces[0][2])
    write_pts(src / "face1.pts", np.full((68, 2), 5.0, np.float32))  # every point in one place: no face box
    with pytest.raises(ValueError, match=r"face1.png: degenerate face box"):
        ingest("artface", src, str(tmp_path / "out"))
    assert not any((tmp_path / "out").glob("*.parquet"))
    manifest = ingest("artface", src, str(tmp_path / "out"), skip_bad=True)
    assert manifest["count"] == 1 and len(manifest["skipped"]) == 1
    assert manifest["skipped"][0].startswith(f"{src / 'face1.png'}: degenerate face box")


def test_every_skipped_face_is_named_in_the_manifest(tmp_path):
    src, faces = artface_folder(tmp_path, 3, points=False)
    write_pts(src / "face0.pts", faces[0][2])
    write_pts(src / "face1.pts", np.full((68, 2), 5.0, np.float32))  # found when the crop is placed
    (src / "face2.pts").write_text("version: 1\n{\n1 2\n}\n")  # found when the files are paired
    write_pts(src / "face3.pts", faces[0][2])  # landmarks without an image
    (src / "notes.pts").write_text("not landmarks, and no image: ignored")
    manifest = ingest("artface", src, str(tmp_path / "out"), skip_bad=True)
    assert manifest["count"] == 1
    assert [m.split(": ", 1) for m in manifest["skipped"]] == [
        [str(src / "face3.pts"), "landmark file without an image"],
        [str(src / "face1.png"), "degenerate face box (5, 5, 5, 5): no width or no height"],
        [str(src / "face2.pts"), "expected 68 points, found 1"]]


def test_a_swap_cut_short_is_refused_by_readers_and_redone(tmp_path, monkeypatch):
    from mdland.data.shards import ShardError

    src, _ = artface_folder(tmp_path, 3)
    dest = str(tmp_path / "out")
    ingest("artface", src, dest, size=64, rows_per_shard=1, source="old")
    real_write = storage.write_bytes
    shards_swapped = []

    def crash_on_second_shard(uri, data):  # the process dies while moving the new shards into place
        if uri.startswith(dest + "/shard-"):
            shards_swapped.append(uri)
            if len(shards_swapped) == 2:
                raise KeyboardInterrupt
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        ingest("artface", src, dest, size=64, rows_per_shard=1, source="new", overwrite=True)
    monkeypatch.setattr(storage, "write_bytes", real_write)
    with pytest.raises(ShardError, match="cut short while swapping"):  # one new shard and two old ones
        read_dataset(dest)
    with pytest.raises(ValueError, match="use --overwrite"):
        ingest("artface", src, dest, size=64, rows_per_shard=1, source="new")
    ingest("artface", src, dest, size=64, rows_per_shard=1, source="new", overwrite=True)
    assert read_dataset(dest).column("source").to_pylist() == ["new"] * 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json", "shard-000000.parquet", "shard-000001.parquet", "shard-000002.parquet"]


def test_16_bit_grey_images_keep_their_tones(tmp_path):
    from mdland.data.ingest import load_image

    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "scan.png")
    image = load_image(tmp_path / "scan.png")
    assert image.shape == (8, 32, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(image[0, :, 1], ramp[0] / 257, atol=1)  # not clipped to white


def test_300w_layout_ingests_in_one_go_and_off_image_or_huge_faces_are_bad(tmp_path, monkeypatch):
    # 300W's splits reuse image names: each image pairs with the annotation beside it, keyed by its path.
    src = tmp_path / "300W"
    faces = make_faces(4)
    names = ["lfpw/trainset/image_0001", "lfpw/testset/image_0001", "afw/face", "helen/far"]
    for name, (_, image, points) in zip(names, faces):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(src / f"{name}.png")
        write_pts(src / f"{name}.pts", points)
    write_pts(src / "helen/far.pts", faces[3][2] + 5000)  # another image's annotation, or other units
    with pytest.raises(ValueError, match=r"helen/far.png: 68 of the 68 landmarks lie off the 320x260 image"):
        ingest("artface", src, str(tmp_path / "out"))
    manifest = ingest("artface", src, str(tmp_path / "out"), size=128, skip_bad=True)
    assert manifest["skipped"] == [f"{src / 'helen/far.png'}: 68 of the 68 landmarks lie off the 320x260 image"]
    table = read_dataset(str(tmp_path / "out"))
    assert sorted(table.column("key").to_pylist()) == ["face", "lfpw/testset/image_0001", "lfpw/trainset/image_0001"]
    check_marker(manifest, str(tmp_path / "out"), 128, 3)
    # A face cut by the image's edge keeps most of its points: not refused.
    cut = faces[3][2].copy()
    cut[:20] -= [400, 0]
    write_pts(src / "helen/far.pts", cut)
    assert ingest("artface", src, str(tmp_path / "out"), overwrite=True)["count"] == 4
    # An image whose name other folders' images share pairs only with the annotation beside it.
    Image.fromarray(faces[0][1]).save(src / "afw/image_0001.png")
    with pytest.raises(ValueError, match=r"afw/image_0001.png: image without a landmark file"):
        ingest("artface", src, str(tmp_path / "out"), overwrite=True)
    (src / "afw/image_0001.png").unlink()
    # Two files of one name in one folder cannot pair.
    Image.fromarray(faces[0][1]).save(src / "afw/face.jpg")
    with pytest.raises(ValueError, match=r"afw/face.png: name clashes with .*afw/face.jpg"):
        ingest("artface", src, str(tmp_path / "out"), overwrite=True)
    (src / "afw/face.jpg").unlink()
    # Over PIL's decompression-bomb limit (a 20000 x 20000 scan under the default one): named, and skippable.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)
    with pytest.raises(ValueError, match=r"afw/face.png: image too large to read \(Image size \(83200 pixels\) "
                                         r"exceeds limit of 60000 pixels\); downscale it"):
        ingest("artface", src, str(tmp_path / "out"), overwrite=True)

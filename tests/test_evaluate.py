import json

import numpy as np
import pytest
import torch

from mdland.cli import main
from mdland.data.procedural import procedural_faces
from mdland.data.shards import Face, ShardWriter, decode_image
from mdland.detector.checkpoint import load_detector, save_checkpoint
from mdland.detector.inference import predict
from mdland.detector.evaluate import eval_faces
from mdland.detector.data import CROP_MARGIN
from mdland.detector.metrics import nme
from mdland.detector.model import ARCHS, STARNet
from mdland.landmarks.align import crop_from_landmarks
from mdland.landmarks.io import StarRow, write_pts, write_star_tsv, write_txt


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    save_checkpoint(STARNet(ARCHS["tiny"]), str(root / "det.pkl"))
    faces = list(procedural_faces(5, seed=4, size=120))
    for fmt in ("art", "cari", "tsv"):
        (root / fmt).mkdir()
    rows = []
    for f in faces:
        for fmt in ("art", "cari", "tsv"):
            (root / fmt / f"{f.key}.png").write_bytes(f.image)
        write_pts(root / "art" / f"{f.key}.pts", f.landmarks)
        write_txt(root / "cari" / f"{f.key}.txt", f.landmarks)
        centre, scale = crop_from_landmarks(f.landmarks, 1.6)  # a TSV's crop: wider than the landmark crop
        rows.append(StarRow(f"{f.key}.png", f.landmarks, scale, centre))
    write_star_tsv(root / "tsv" / "test.tsv", rows)
    writer = ShardWriter(str(root / "shards"))
    for f in faces:
        writer.add(f)
    writer.close()
    return root, faces


def test_every_reader_format_gives_the_same_scores(setup):
    root, faces = setup
    out = root / "report"
    assert main(["evaluate", "--detector", str(root / "det.pkl"), "--data", f"artface={root / 'art'}",
                 "--data", f"cariface={root / 'cari'}", "--data", f"tsv={root / 'tsv' / 'test.tsv'}",
                 "--format", "artface", "--format", "cariface", "--format", "star-tsv", "--out", str(out)]) == 0
    rows = json.loads((out / "metrics.json").read_text())
    # The same faces by three readers: the numbers of scoring the predictions by hand, on crops around the
    # landmarks, and on the TSV's own crops for the TSV (as STAR evaluates its sets).
    net = load_detector(str(root / "det.pkl")).eval()
    images = [decode_image(f.image) for f in faces]
    gt = np.stack([f.landmarks for f in faces])
    pred = predict(net, images, [crop_from_landmarks(p, CROP_MARGIN) for p in gt])
    expected = nme(pred, gt).mean()
    expected_tsv = nme(predict(net, images, [crop_from_landmarks(p, 1.6) for p in gt]), gt).mean()
    assert [r["name"] for r in rows] == ["artface", "cariface", "tsv"]
    assert abs(expected_tsv - expected) > 1e-3
    for r, want in zip(rows, [expected, expected, expected_tsv]):
        assert r["count"] == 5 and r["nme"] == pytest.approx(want, rel=1e-4)
    per_face = {f["key"]: f["nme"] for f in json.loads((out / "per-face.json").read_text())["artface"]}
    assert sorted(per_face) == sorted(f.key for f in faces)
    assert all(per_face[f.key] == pytest.approx(e, rel=1e-4) for f, e in zip(faces, nme(pred, gt)))
    assert "| artface | 5 |" in (out / "metrics.md").read_text()
    for name in ("ced.png", "overlays-artface.png", "overlays-tsv.png"):
        assert (out / name).stat().st_size > 1000
    assert main(["evaluate", "--detector", str(root / "det.pkl"), "--data", str(root / "shards"),
                 "--out", str(root / "r2")]) == 0
    assert json.loads((root / "r2" / "metrics.json").read_text())[0]["nme"] == pytest.approx(expected, rel=1e-4)
    assert main(["evaluate", "--detector", str(root / "det.pkl"), "--data", str(root / "shards"), "--norm", "box",
                 "--out", str(root / "r3")]) == 0
    by_box = json.loads((root / "r3" / "metrics.json").read_text())[0]
    assert by_box["norm"] == "box" and by_box["nme"] == pytest.approx(nme(pred, gt, "box").mean(), rel=1e-4)
    # STAR's layout: annotations apart from the images (--image-dir), beside a shard set (--format shards). The
    # report replaces the earlier one's overlays of sets this run has not.
    (root / "anno").mkdir()
    (root / "tsv" / "test.tsv").rename(root / "anno" / "test.tsv")
    try:
        assert main(["evaluate", "--detector", str(root / "det.pkl"), "--data", f"tsv={root / 'anno' / 'test.tsv'}",
                     "--data", str(root / "shards"), "--format", "star-tsv", "--format", "shards", "--image-dir",
                     str(root / "tsv"), "--out", str(out)]) == 0
    finally:
        (root / "anno" / "test.tsv").rename(root / "tsv" / "test.tsv")
    rows = json.loads((out / "metrics.json").read_text())
    assert [(r["name"], r["count"]) for r in rows] == [("tsv", 5), ("shards", 5)]
    assert rows[0]["nme"] == pytest.approx(expected_tsv, rel=1e-4)
    assert sorted(p.name for p in out.glob("overlays-*")) == ["overlays-shards.png", "overlays-tsv.png"]
    # A path holding "=" (hive-style prefixes) is a path, not NAME=PATH.
    hive = root / "year=2024"
    hive.symlink_to(root / "shards")
    assert main(["evaluate", "--detector", str(root / "det.pkl"), "--data", str(hive), "--out", str(root / "r4")]) == 0
    assert json.loads((root / "r4" / "metrics.json").read_text())[0]["name"] == "year=2024"


def test_bad_evaluate_arguments_fail_before_inference(setup, capsys):
    root, _ = setup
    args = ["evaluate", "--detector", str(root / "det.pkl"), "--out", str(root / "never")]
    assert main(args + ["--data", str(root / "shards"), "--data", f"{root}/../{root.name}/shards"]) == 2
    assert "two sets named ['shards']" in capsys.readouterr().err
    assert main(args + ["--data", str(root / "shards"), "--threshold", "0.0999"]) == 2
    assert "threshold: 0.0999 / 0.0001 must be an even whole number" in capsys.readouterr().err
    assert not (root / "never").exists()


def test_bad_faces_fail_by_name_or_are_skipped(setup, tmp_path):
    root, faces = setup
    src = tmp_path / "bad"
    src.mkdir()
    for f in faces:
        (src / f"{f.key}.png").write_bytes(f.image)
        write_pts(src / f"{f.key}.pts", f.landmarks)
    (src / f"{faces[0].key}.pts").unlink()  # an image without landmarks
    (src / f"{faces[1].key}.pts").write_text("version: 1\nn_points: 5\n{\n" + "1 1\n" * 5 + "}\n")  # wrong count
    (src / f"{faces[2].key}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # unreadable image
    args = ["evaluate", "--detector", str(root / "det.pkl"), "--data", str(src), "--format", "artface",
            "--out", str(tmp_path / "r")]
    assert main(args) == 2
    assert main(args + ["--skip-bad"]) == 0
    row = json.loads((tmp_path / "r" / "metrics.json").read_text())[0]
    assert row["count"] == 2 and sorted(m.split(": ")[0] for m in row["skipped"]) == sorted(
        str(src / f"{f.key}{suffix}") for f, suffix in ((faces[0], ".png"), (faces[1], ".pts"), (faces[2], ".png")))
    assert "bad: 3 bad face(s) skipped" in (tmp_path / "r" / "metrics.md").read_text()
    # A bad set after a good one fails before any inference: the report there is left as it was, not half replaced.
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}
    assert main(["evaluate", "--detector", str(root / "det.pkl"), "--data", f"good={root / 'art'}", "--data",
                 str(src), "--format", "artface", "--out", str(tmp_path / "r")]) == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == before
    write_pts(src / "far.pts", faces[3].landmarks + 5000)  # another image's annotation, or other units
    (src / "far.png").write_bytes(faces[3].image)
    for name, message in ((faces[0].key, "image without a landmark file"), (faces[1].key, "expected 68 points"),
                          (faces[2].key, "unreadable image"), ("far", "68 of the 68 landmarks lie off the")):
        only = tmp_path / name  # one good face beside the bad one: the error names the bad one
        only.mkdir()
        (only / f"{faces[3].key}.png").write_bytes(faces[3].image)
        write_pts(only / f"{faces[3].key}.pts", faces[3].landmarks)
        for suffix in (".png", ".pts"):
            if (src / f"{name}{suffix}").exists():
                (only / f"{name}{suffix}").write_bytes((src / f"{name}{suffix}").read_bytes())
        with pytest.raises(ValueError, match=f"{name}.*{message}"):
            eval_faces(str(only), "artface")
    # Landmarks whose outer eye corners coincide have no inter-ocular NME: named before inference, or skipped.
    points = faces[3].landmarks.copy()
    points[45] = points[36]
    degenerate = tmp_path / "degenerate"
    writer = ShardWriter(str(degenerate))
    writer.add(faces[4])
    writer.add(Face(image=faces[3].image, landmarks=points, key="squint"))
    writer.close()
    with pytest.raises(ValueError, match=r"degenerate: squint: normalising distance \(inter_ocular\) is zero"):
        eval_faces(str(degenerate))
    assert [f.key for f in eval_faces(str(degenerate), skip_bad=True)] == [faces[4].key]
    assert len(eval_faces(str(degenerate), norm="box")) == 2
    ShardWriter(str(tmp_path / "none")).close()  # a set with a manifest and no shard
    with pytest.raises(ValueError, match="none: no faces to evaluate"):
        eval_faces(str(tmp_path / "none"))


def test_reports_go_to_s3(setup, s3_bucket, tmp_path, monkeypatch, capsys):
    from mdland.data import storage

    root, _ = setup
    monkeypatch.chdir(tmp_path)
    out = f"{s3_bucket}/eval/run1"
    assert main(["evaluate", "--detector", str(root / "det.pkl"), "--data", f"art={root / 'shards'}",
                 "--out", out]) == 0
    assert storage.list_files(out) == [f"{out}/{n}" for n in ("ced.png", "metrics.json", "metrics.md",
                                                             "overlays-art.png", "per-face.json")]
    assert json.loads(storage.read_bytes(f"{out}/metrics.json"))[0]["count"] == 5
    assert not any(tmp_path.iterdir())  # no local folder named after the URI
    assert main(["evaluate-preds", str(root / "shards"), str(root / "shards"), "--out", f"{s3_bucket}/p"]) == 0
    assert json.loads(storage.read_bytes(f"{s3_bucket}/p/metrics.json"))["nme"] == 0
    missing = "s3://no-such-bucket-mdland/eval"
    capsys.readouterr()
    assert main(["evaluate", "--detector", str(root / "det.pkl"), "--data", str(root / "shards"), "--out", missing]) == 2
    assert "the bucket does not exist" in capsys.readouterr().err


def test_overlays_show_each_face_once_in_its_crop_undistorted():
    from mdland.detector.evaluate import OVERLAY_MARGIN, EvalFace, eval_crop, overlay_grid
    from mdland.landmarks.align import crop_matrix, transform_points

    faces = []
    for f in procedural_faces(5, seed=3, size=120):
        wide = np.zeros((120, 200, 3), np.uint8)  # a landscape image, the face in its left part
        wide[:, :120] = decode_image(f.image)
        faces.append(EvalFace(f.key, wide, f.landmarks))
    pred = np.stack([f.landmarks + [3.0, 0.0] for f in faces])
    errors = np.array([0.3, 0.1, 0.5, 0.2, 0.4])
    grid = overlay_grid(faces, pred, errors, size=96)
    # 5 faces: the 3 worst above, the 2 best below, none twice; square tiles whatever the image's shape.
    assert grid.shape == (2 * 98 + 2, 3 * 98 + 2, 3)
    assert (grid[100:, 2 + 2 * 98:] == 255).all()  # the bottom row's third place is empty
    for place, face in enumerate([2, 4, 0, 1, 3]):
        row, column = divmod(place, 3)
        tile = grid[2 + row * 98: 98 + row * 98, 2 + column * 98: 98 + column * 98]
        centre, scale = eval_crop(faces[face])
        matrix = crop_matrix(centre, scale * OVERLAY_MARGIN, 96)
        truth = np.round(transform_points(faces[face].landmarks, matrix)).astype(int)
        guess = np.round(transform_points(pred[face], matrix)).astype(int)
        # Truth red and prediction green where the face's crop (a similarity: no squashing) puts them.
        inside = ((guess >= 0) & (guess < 96)).all(axis=1)
        assert inside.mean() > 0.9
        assert (tile[truth[:, 1], truth[:, 0]] == [255, 0, 0]).all(axis=1).mean() > 0.5
        assert (tile[guess[inside, 1], guess[inside, 0]] == [0, 255, 0]).all(axis=1).mean() > 0.9

import contextlib
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from mdland.cli import main
from mdland.data import storage
from mdland.data.ingest import load_image
from mdland.data.procedural import procedural_faces
from mdland.data.shards import decode_image
from mdland.detector.checkpoint import load_detector, save_checkpoint
from mdland.detector.data import CROP_MARGIN
from mdland.detector.inference import predict
from mdland.detector.metrics import nme
from mdland.detector.model import ARCHS, STARNet
from mdland.detector.predict import predict_folder
from mdland.landmarks.align import crop_from_landmarks
from mdland.landmarks.io import read_landmark_file, read_pts, write_pts, write_txt


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny detector and a folder of 5 procedural faces (two in a subfolder) with their .pts annotations."""
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    save_checkpoint(STARNet(ARCHS["tiny"]), str(root / "det.pkl"))
    faces = list(procedural_faces(5, seed=4, size=120))
    (root / "images" / "sub").mkdir(parents=True)
    for i, f in enumerate(faces):
        (root / "images" / ("sub" if i % 2 else "") / f"{f.key}.png").write_bytes(f.image)
        write_pts(root / "images" / f"{f.key}.pts", f.landmarks)
    return root, faces


@contextlib.contextmanager
def logged(caplog):
    """mdland's log records into `caplog` (mdland's logger does not propagate to the root, where caplog listens)."""
    logger = logging.getLogger("mdland")
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


def edge_box(centre: tuple[float, float], scale: float) -> list[float]:
    """The square box, in a face detector's pixel-edge coordinates, of a (pixel-centre centre, scale) crop."""
    half = scale * 200 / 2
    return [centre[0] + 0.5 - half, centre[1] + 0.5 - half, centre[0] + 0.5 + half, centre[1] + 0.5 + half]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_predictions_are_the_detectors_and_score_with_evaluate_preds(folder, where, request, tmp_path, caplog):
    root, faces = folder
    out = str(tmp_path / "preds") if where == "local" else request.getfixturevalue("s3_bucket") + "/preds"
    # Boxes for three faces: the evaluation crops around their landmarks; the other two are taken whole, and it is
    # said.
    crops = {f.key: crop_from_landmarks(f.landmarks, CROP_MARGIN) for f in faces[:3]}
    (tmp_path / "boxes.json").write_text(json.dumps({k: edge_box(*c) for k, c in crops.items()}))
    with logged(caplog):
        assert main(["predict", "--detector", str(root / "det.pkl"), str(root / "images"), "--out", out,
                     "--boxes", str(tmp_path / "boxes.json"), "--batch-size", "2"]) == 0
    assert f"2 image(s) have no box in {tmp_path / 'boxes.json'} and are taken whole" in caplog.text

    net = load_detector(str(root / "det.pkl")).eval()
    # The whole 120 px image: centre at pixel 59.5, 120 px across.
    expected = predict(net, [decode_image(f.image) for f in faces],
                       [crops.get(f.key, ((59.5, 59.5), 120 / 200)) for f in faces])
    local = tmp_path / "fetched"
    storage.copy_to_local(out, local)
    written = json.loads((local / "predictions.json").read_text())
    assert sorted(written["faces"]) == sorted(f.key for f in faces) and written["skipped"] == []
    for f, e in zip(faces, expected):
        np.testing.assert_allclose(read_pts(local / f"{f.key}.pts"), e, atol=1e-3)
        np.testing.assert_allclose(written["faces"][f.key]["landmarks"], e, atol=1e-3)
    assert written["faces"][faces[4].key] == {**written["faces"][faces[4].key], "box": [0, 0, 120, 120],
                                              "file": f"{faces[4].key}.png"}
    assert written["faces"][faces[1].key]["file"] == f"sub/{faces[1].key}.png"
    assert Image.open(local / "overlays.png").size[0] > 3 * 192

    # The .pts files are what evaluate-preds pairs with the annotations by stem.
    assert main(["evaluate-preds", str(local), str(root / "images"), "--out", str(tmp_path / "scores")]) == 0
    scores = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    assert scores["count"] == 5
    assert scores["nme"] == pytest.approx(nme(expected, np.stack([f.landmarks for f in faces])).mean(), abs=1e-4)


def test_exif_turned_photo_is_read_upright(folder, tmp_path):
    root, _ = folder
    (tmp_path / "photos").mkdir()
    stored = np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers turn it 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "photos" / "phone.png", exif=exif)
    np.testing.assert_array_equal(load_image(tmp_path / "photos" / "phone.png"), np.rot90(stored, k=-1))
    assert main(["predict", "--detector", str(root / "det.pkl"), str(tmp_path / "photos"),
                 "--out", str(tmp_path / "preds")]) == 0
    written = json.loads((tmp_path / "preds" / "predictions.json").read_text())
    assert written["faces"]["phone"]["box"] == [0, 0, 50, 80] and written["complete"]


def test_bad_images_boxes_and_outputs_are_named_and_nothing_is_lost(folder, tmp_path, capsys):
    root, faces = folder
    images = tmp_path / "images"
    images.mkdir()
    for f in faces[:3]:
        (images / f"{f.key}.png").write_bytes(f.image)
    (images / "broken.png").write_bytes(faces[3].image[:200])
    det = str(root / "det.pkl")

    def run(*args: str) -> tuple[int, str]:
        code = main(["predict", "--detector", det, *args])
        return code, capsys.readouterr().err

    out = tmp_path / "preds"
    code, err = run(str(images), "--out", str(out))
    assert code == 2 and f"{images / 'broken.png'}: unreadable image" in err
    assert not out.exists()  # nothing half-written

    code, _ = run(str(images), "--out", str(out), "--skip-bad")
    assert code == 0
    written = json.loads((out / "predictions.json").read_text())
    assert len(written["faces"]) == 3 and written["skipped"][0].startswith(f"{images / 'broken.png'}: unreadable")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    boxes = tmp_path / "boxes.json"
    for content, message in [
        (json.dumps({"nobody": [0, 0, 10, 10]}), "1 box(es) for images the folder does not have, e.g. ['nobody']"),
        (json.dumps({faces[0].key: "0,0,10,10"}), f"{faces[0].key}: expected [x0, y0, x1, y1]"),
        ("[1, 2]", "expected an object"),
        ("{", "not a JSON file of face boxes"),
    ]:
        boxes.write_text(content)
        # --skip-bad passes a bad face, not a bad box file.
        code, err = run(str(images), "--out", str(out), "--boxes", str(boxes), "--skip-bad")
        assert code == 2 and message in err, (content, err)
    # Every failed run left the earlier predictions as they were.
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # Boxes outside their image, or too large for a float, are bad faces: named, and skipped with --skip-bad. The
    # earlier run's files for the faces this run has not are removed: evaluate-preds would score them.
    huge = "1" + "0" * 400  # valid JSON, and no float
    boxes.write_text(f'{{"{faces[0].key}": [500, 500, 600, 600], "{faces[1].key}": [0, 0, {huge}, 10]}}')
    code, err = run(str(images), "--out", str(out), "--boxes", str(boxes), "--skip-bad")
    written = json.loads((out / "predictions.json").read_text())
    assert code == 0 and written["complete"] and sorted(written["faces"]) == [faces[2].key]
    assert f"{images / faces[0].key}.png: box [500.0, 500.0, 600.0, 600.0] is outside the 120x120 image" in \
        written["skipped"]
    assert any(m.startswith(f"{images / faces[1].key}.png: expected four finite numbers") for m in written["skipped"])
    assert sorted(p.name for p in out.glob("*.pts")) == [f"{faces[2].key}.pts"]

    for inside in (images, images / "preds", tmp_path):  # the next run would read its own outputs as images
        code, err = run(str(images), "--out", str(inside))
        assert code == 2 and "is, or is inside, or holds the image folder" in err
    annotated = tmp_path / "annotations"
    annotated.mkdir()
    for write in (write_pts, write_txt):  # iBUG and CariFace annotations
        write(annotated / f"{faces[0].key}.{write.__name__[-3:]}", faces[0].landmarks)
        code, err = run(str(images), "--out", str(annotated), "--skip-bad")
        assert code == 2 and "holds landmark files mdland predict did not write" in err
        assert read_landmark_file(annotated / f"{faces[0].key}.{write.__name__[-3:]}") == pytest.approx(
            faces[0].landmarks, abs=1e-3)
        (annotated / f"{faces[0].key}.{write.__name__[-3:]}").unlink()
    (annotated / "notes.md").write_text("notes")
    assert run(str(images), "--out", str(annotated), "--skip-bad")[0] == 0  # other files are no concern


    code, err = run(str(tmp_path / "nowhere"), "--out", str(out))
    assert code == 2 and "not a folder of images" in err


def test_300w_layout_folders_reusing_names_pair_by_path(folder, tmp_path, caplog):
    # 300W's splits reuse image names (lfpw/trainset/image_0001 and lfpw/testset/image_0001): predictions keep the
    # folders, and evaluate-preds pairs them with the annotations beside each image.
    root, faces = folder
    images = tmp_path / "300W"
    layout = ["lfpw/trainset/image_0001", "lfpw/testset/image_0001", "afw/face"]
    for name, f in zip(layout, faces):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / f"{name}.png").write_bytes(f.image)
        write_pts(images / f"{name}.pts", f.landmarks)
    (images / "unannotated.png").write_bytes(faces[3].image)
    out = tmp_path / "preds"
    assert main(["predict", "--detector", str(root / "det.pkl"), str(images), "--out", str(out)]) == 0
    written = json.loads((out / "predictions.json").read_text())
    assert sorted(written["faces"]) == ["face", "lfpw/testset/image_0001", "lfpw/trainset/image_0001", "unannotated"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.pts")) == [
        "face.pts", "lfpw/testset/image_0001.pts", "lfpw/trainset/image_0001.pts", "unannotated.pts"]
    net = load_detector(str(root / "det.pkl")).eval()
    whole = [((59.5, 59.5), 120 / 200)] * 4  # each 120 px image taken whole
    expected = predict(net, [decode_image(f.image) for f in faces[:4]], whole)
    truth = np.stack([f.landmarks for f in faces[:4]])
    with logged(caplog):
        assert main(["evaluate-preds", str(out), str(images), "--out", str(tmp_path / "scores")]) == 0
    # Predictions on more faces than are annotated are scored on the annotated ones, and it is said.
    assert f"1 prediction(s) without ground truth in {images} are not scored, e.g. ['unannotated']" in caplog.text
    scores = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    assert scores["count"] == 3 and scores["nme"] == pytest.approx(nme(expected[:3], truth[:3]).mean(), abs=1e-4)
    # Datasets ship split lists and READMEs as .txt beside the annotations: not landmarks, not in the way.
    (images / "lfpw" / "testset" / "README.txt").write_text("LFPW test split\n")
    assert main(["evaluate-preds", str(out), str(images)]) == 0
    # The annotations lie in subfolders, where predictions of nested keys would go: an --out holding them is refused.
    before = (images / "lfpw/testset/image_0001.pts").read_bytes()
    for p in (images / "lfpw").rglob("*"):
        if p.is_file():
            (tmp_path / "annotated" / p.relative_to(images)).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "annotated" / p.relative_to(images)).write_bytes(p.read_bytes())
    with pytest.raises(ValueError, match=r"holds landmark files mdland predict did not write, e.g. .*lfpw/"):
        predict_folder(str(root / "det.pkl"), str(images), str(tmp_path / "annotated"))
    assert (tmp_path / "annotated/lfpw/testset/image_0001.pts").read_bytes() == before

    # CariFace keeps images and landmark files in folders of their own: --format reads the annotations as ingest
    # does, keyed by image, so predictions on its images pair with them.
    cari = tmp_path / "cariface"
    (cari / "images").mkdir(parents=True)
    (cari / "landmarks").mkdir()
    for f in faces[:4]:
        (cari / "images" / f"{f.key}.png").write_bytes(f.image)
        write_txt(cari / "landmarks" / f"{f.key}.txt", f.landmarks)
    assert main(["predict", "--detector", str(root / "det.pkl"), str(cari / "images"), "--out",
                 str(tmp_path / "cp")]) == 0
    assert main(["evaluate-preds", str(tmp_path / "cp"), str(cari), "--format", "cariface", "--out",
                 str(tmp_path / "cs")]) == 0
    scores = json.loads((tmp_path / "cs" / "metrics.json").read_text())
    assert scores["count"] == 4 and scores["nme"] == pytest.approx(nme(expected, truth).mean(), abs=1e-4)

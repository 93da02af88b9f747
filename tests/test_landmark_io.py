import json

import numpy as np
import pytest

from mdland.landmarks.io import (
    FFHQEntry, StarRow, read_ffhq_json, read_landmark_file, read_pts, read_star_tsv, read_txt, write_ffhq_json,
    write_pts, write_star_tsv, write_txt,
)

POINTS = (np.arange(136, dtype=np.float32).reshape(68, 2) * 1.5 + 3.25)


def test_pts_round_trip_and_one_based_convention(tmp_path):
    path = tmp_path / "a.pts"
    write_pts(path, POINTS)
    np.testing.assert_allclose(read_pts(path), POINTS, atol=1e-4)
    # The file itself is 1-based: the first point is stored one pixel further.
    first = path.read_text().splitlines()[3].split()
    assert float(first[0]) == pytest.approx(POINTS[0, 0] + 1)
    np.testing.assert_allclose(read_pts(path, one_based=False), POINTS + 1, atol=1e-4)


def test_pts_written_by_hand_reads_zero_based(tmp_path):
    body = "\n".join("1 1" if i == 0 else f"{i + 1} {2 * i + 1}" for i in range(68))
    path = tmp_path / "h.pts"
    path.write_text(f"version: 1\nn_points:  68\n{{\n{body}\n}}\n")
    pts = read_pts(path)
    assert pts[0].tolist() == [0, 0] and pts[5].tolist() == [5, 10]


@pytest.mark.parametrize("content,needle", [
    ("version: 1\nn_points: 68\n{\n" + "1 2\n" * 67 + "}\n", "n_points says 68 but the file has 67"),
    ("version: 1\n{\n" + "1 2\n" * 30 + "x 2\n" + "1 2\n" * 37 + "}\n", "h.pts:33: non-numeric"),
    ("version: 1\n{\n" + "1 2\n" * 10 + "nan 2\n" + "1 2\n" * 57 + "}\n", "h.pts:13: coordinate is not finite"),
    ("1 2\n" * 68, "no '{' ... '}' block"),
])
def test_pts_errors_name_file_and_line(tmp_path, content, needle):
    path = tmp_path / "h.pts"
    path.write_text(content)
    with pytest.raises(ValueError, match=needle):
        read_pts(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="nope.pts: landmark file not found"):
        read_pts(tmp_path / "nope.pts")
    with pytest.raises(ValueError, match="unknown landmark file type"):
        read_landmark_file(tmp_path / "x.csv")


def test_txt_round_trip_and_errors(tmp_path):
    path = tmp_path / "c.txt"
    write_txt(path, POINTS)
    np.testing.assert_allclose(read_txt(path), POINTS, atol=1e-4)
    np.testing.assert_allclose(read_landmark_file(path), POINTS, atol=1e-4)
    path.write_text("1 2\n" * 67)
    with pytest.raises(ValueError, match="expected 68 lines"):
        read_txt(path)
    path.write_text("1 2\n" * 5 + "1 2 3\n" + "1 2\n" * 62)
    with pytest.raises(ValueError, match="c.txt:6: expected 'x y'"):
        read_txt(path)


def test_ffhq_json_round_trip_both_variants(tmp_path):
    path = tmp_path / "ffhq-dataset-v2.json"
    entries = [FFHQEntry("0", "images1024x1024/00000/00000.png", POINTS),
               FFHQEntry("1", "images1024x1024/00000/00001.png", POINTS + 1)]
    write_ffhq_json(path, entries)
    back = read_ffhq_json(path)
    assert [e.file_path for e in back] == [e.file_path for e in entries]
    np.testing.assert_allclose(back[1].landmarks, POINTS + 1)
    data = json.loads(path.read_text())
    data["0"]["in_the_wild"] = {"file_path": "in-the-wild-images/00000.png", "face_landmarks": (POINTS * 2).tolist()}
    data["1"]["in_the_wild"] = data["0"]["in_the_wild"]
    path.write_text(json.dumps(data))
    wild = read_ffhq_json(path, "in_the_wild")
    assert wild[0].file_path == "in-the-wild-images/00000.png"
    np.testing.assert_allclose(wild[0].landmarks, POINTS * 2)


def test_ffhq_json_errors(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"0": {"image": {"file_path": "a.png", "face_landmarks": [[1, 2]] * 67}}}))
    with pytest.raises(ValueError, match="entry 0: expected 68x2"):
        read_ffhq_json(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="f.json:1: invalid JSON"):
        read_ffhq_json(path)
    with pytest.raises(ValueError, match="unknown FFHQ variant"):
        read_ffhq_json(path, "thumbnail")


def test_star_tsv_round_trip_with_and_without_header(tmp_path):
    path = tmp_path / "train.tsv"
    rows = [StarRow("img/a.jpg", POINTS, 1.234, (100.5, 120.25)), StarRow("img/b.jpg", POINTS + 2, 0.9, (50, 60))]
    write_star_tsv(path, rows)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("image_path\tlandmarks_5pts") and len(lines) == 3
    five = np.array(lines[1].split("\t")[1].split(","), dtype=float).reshape(5, 2)
    np.testing.assert_allclose(five[2], POINTS[30], atol=1e-3)  # nose tip
    other_names = "\t".join(["path", "five", "points", "s", "x", "y"])  # pandas takes any first row for names
    for text in (path.read_text(), "\n".join(lines[1:]) + "\n", "\n".join(["", other_names, *lines[1:]]) + "\n"):
        path.write_text(text)
        back = read_star_tsv(path)
        assert [r.image_path for r in back] == ["img/a.jpg", "img/b.jpg"]
        np.testing.assert_allclose(back[1].landmarks, POINTS + 2, atol=1e-3)
        assert back[0].scale == pytest.approx(1.234) and back[0].center == pytest.approx((100.5, 120.25))


def test_star_tsv_errors_name_row_and_field(tmp_path):
    path = tmp_path / "t.tsv"
    write_star_tsv(path, [StarRow("a.jpg", POINTS, 1.0, (1, 2))])
    fields = path.read_text().splitlines()[1].split("\t")
    fields[2] = ",".join(fields[2].split(",")[:-2])
    path.write_text("\t".join(fields) + "\n")
    with pytest.raises(ValueError, match=r"t.tsv:1 \(landmarks_target\): expected 136"):
        read_star_tsv(path)
    path.write_text("a.jpg\t1,2\n")
    with pytest.raises(ValueError, match="t.tsv:1: expected at least 6"):
        read_star_tsv(path)
    write_star_tsv(path, [StarRow("a.jpg", POINTS, 1.0, (1, 2)), StarRow("b.jpg", POINTS, 0.0, (1, 2))])
    with pytest.raises(ValueError, match="t.tsv:3: scale must be positive, got 0.0"):
        read_star_tsv(path)

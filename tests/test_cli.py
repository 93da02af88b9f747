import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mdland.cli import main
from mdland.data.procedural import procedural_faces
from mdland.data.shards import ShardWriter
from mdland.landmarks.io import StarRow, write_pts, write_star_tsv, write_txt


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mdland", *args], capture_output=True, text=True, timeout=300)


def exit_code(*args: str) -> int:
    """`main`'s exit code, where the argument parser's refusals exit with 2 (SystemExit)."""
    try:
        return main(list(args))
    except SystemExit as e:
        return e.code


def test_help_lists_the_stages():
    out = run_cli("--help")
    assert out.returncode == 0
    for stage in ("ingest", "render", "evaluate-preds", "demo"):
        assert stage in out.stdout


def test_ingest_and_render_from_the_command_line(tmp_path):
    src = tmp_path / "art"
    src.mkdir()
    for f in procedural_faces(3, seed=2, size=160):
        (src / f"{f.key}.png").write_bytes(f.image)
        write_pts(src / f"{f.key}.pts", f.landmarks)
    out = run_cli("ingest", "--format", "artface", str(src), str(tmp_path / "ds"), "--size", "96")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"count": 3, "shards": 1, "skipped": 0}
    assert main(["render", str(tmp_path / "ds"), str(tmp_path / "grid.png"), "--columns", "3", "--condition"]) == 0
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == (6 * 98 + 2, 98 + 2)
    assert main(["render", str(src), str(tmp_path / "raw.png"), "--format", "artface", "--count", "2"]) == 0
    with Image.open(tmp_path / "raw.png") as im:
        assert im.size == (2 * 162 + 2, 162 + 2)
    assert exit_code("render", str(tmp_path / "ds"), str(tmp_path / "none.png"), "--count", "0") == 2
    assert not (tmp_path / "none.png").exists()
    # A STAR TSV kept apart from its images (STAR's layout) reads them from --image-dir.
    (tmp_path / "anno").mkdir()
    write_star_tsv(tmp_path / "anno" / "test.tsv", [StarRow(f"{f.key}.png", f.landmarks, 1.0, (80.0, 80.0))
                                                    for f in procedural_faces(3, seed=2, size=160)])
    assert exit_code("render", str(tmp_path / "anno" / "test.tsv"), str(tmp_path / "tsv.png"), "--format",
                     "star-tsv") == 2
    assert main(["render", str(tmp_path / "anno" / "test.tsv"), str(tmp_path / "tsv.png"), "--format", "star-tsv",
                 "--image-dir", str(src), "--count", "2"]) == 0
    with Image.open(tmp_path / "tsv.png") as im, Image.open(tmp_path / "raw.png") as raw:
        assert np.array_equal(np.asarray(im), np.asarray(raw))  # the same faces and points as the .pts folder


def test_evaluate_preds_hand_computed(tmp_path, capsys):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    faces = list(procedural_faces(4, seed=9, size=256))
    offsets = [0.0, 1.0, 2.0, 40.0]  # pixels, along x, for every point
    for f, dx in zip(faces, offsets):
        write_pts(gt_dir / f"{f.key}.pts", f.landmarks)
        write_txt(pred_dir / f"{f.key}.txt", f.landmarks + [dx, 0])
    assert main(["evaluate-preds", str(pred_dir), str(gt_dir), "--out", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    iod = np.array([np.linalg.norm(f.landmarks[36] - f.landmarks[45]) for f in faces])
    expected = np.array(offsets) / iod
    assert result["count"] == 4
    assert result["nme"] == pytest.approx(expected.mean(), rel=1e-4)
    assert result["fr"] == pytest.approx(np.mean(expected > 0.10))
    assert (tmp_path / "ev" / "ced.png").stat().st_size > 1000
    assert "| predictions | 4 |" in capsys.readouterr().out
    # A ground-truth face without an inter-ocular distance is named by its key.
    flat = faces[2].landmarks.copy()
    flat[45] = flat[36]
    write_pts(gt_dir / f"{faces[2].key}.pts", flat)
    assert main(["evaluate-preds", str(pred_dir), str(gt_dir)]) == 2
    assert f"face {faces[2].key}: normalising distance (inter_ocular) is zero" in capsys.readouterr().err
    write_pts(gt_dir / f"{faces[2].key}.pts", faces[2].landmarks)
    # Predictions as an (N, 68, 2) .npy against a shard dataset keyed by row index is refused clearly...
    np.save(tmp_path / "p.npy", np.zeros((3, 68, 2)))
    assert main(["evaluate-preds", str(tmp_path / "p.npy"), str(gt_dir)]) == 2
    # Non-finite coordinates (NaN would give NME nan and write `Infinity` into metrics.json) and files that are
    # not arrays are named.
    rows = np.zeros((4, 68, 2))
    rows[2, 5, 1] = np.nan
    np.save(tmp_path / "nan.npy", rows)
    (tmp_path / "text.npy").write_text("not an array")
    capsys.readouterr()
    assert main(["evaluate-preds", str(tmp_path / "nan.npy"), str(tmp_path / "nan.npy")]) == 2
    assert f"{tmp_path / 'nan.npy'}: row 2: landmark 5 is not finite" in capsys.readouterr().err
    assert main(["evaluate-preds", str(tmp_path / "text.npy"), str(gt_dir)]) == 2
    assert f"{tmp_path / 'text.npy'}: not a NumPy array file" in capsys.readouterr().err
    # ...and shard datasets pair by their key column.
    writer = ShardWriter(str(tmp_path / "ds"))
    for f in faces:
        writer.add(f)
    writer.close()
    assert main(["evaluate-preds", str(pred_dir), str(tmp_path / "ds"), "--out", str(tmp_path / "ev2")]) == 0
    assert json.loads((tmp_path / "ev2" / "metrics.json").read_text())["nme"] == pytest.approx(result["nme"])
    # Two landmark files for one face: refused, not one picked.
    write_pts(pred_dir / f"{faces[0].key}.pts", faces[0].landmarks + [5, 0])
    assert main(["evaluate-preds", str(pred_dir), str(gt_dir)]) == 2
    assert f"{faces[0].key}.txt: name clashes with {pred_dir / faces[0].key}.pts" in capsys.readouterr().err


def test_bad_input_exits_2_with_a_message(tmp_path):
    out = run_cli("ingest", "--format", "artface", str(tmp_path / "missing"), str(tmp_path / "ds"))
    assert out.returncode == 2
    assert "mdland ingest: error:" in out.stderr and "missing: source not found" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_malformed_override_is_a_clear_error(capsys, tmp_path):
    # One parser for `--set key=value`, whether it feeds a config (train-detector) or Serve's options.
    assert main(["train-detector", "--config", "tiny", "--set", "epochs"]) == 2
    assert "override 'epochs': expected key=value" in capsys.readouterr().err
    assert main(["serve", "--detector", str(tmp_path / "d.pkl"), "--set", "max_batch_size"]) == 2
    assert "override 'max_batch_size': expected key=value" in capsys.readouterr().err
    assert main(["train-detector", "--config", "tiny", "--set", "epochs=2.7"]) == 2  # not silently 2 epochs
    assert "epochs: expected int, got 2.7" in capsys.readouterr().err
    assert main(["train-detector", "--config", "tiny", "--set", "name="]) == 2  # not a run named "None"
    assert "name: expected text, got None" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- epochs: 3\n")
    assert main(["train-detector", "--config", str(tmp_path / "list.yaml")]) == 2
    assert "list.yaml: expected a mapping of config keys, got a list" in capsys.readouterr().err
    assert main(["train-detector", "--config", "tiny", "--set", "data=[a"]) == 2  # not a YAML traceback
    assert "override 'data=[a': not a YAML value" in capsys.readouterr().err
    assert main(["train-detector", "--config", "tiny", "--set", "bogus=1"]) == 2  # named as given, not the file's
    assert "--set: unknown key(s) ['bogus']" in capsys.readouterr().err
    assert main(["train-controlnet", "--config", "stage3"]) == 2
    assert "--config stage3: no such file, nor a shipped config (stage1, stage2, tiny-stage1, tiny-stage2)" in \
        capsys.readouterr().err


def test_repeated_set_options_all_apply_and_the_log_level_goes_either_side_of_the_stage():
    from mdland.cli import build_parser

    args = build_parser().parse_args(["train-controlnet", "--set", "max_steps=5", "--set", "name=x", "y=1",
                                      "--log-level", "debug"])
    assert args.set == ["max_steps=5", "name=x", "y=1"] and args.log_level == "DEBUG"  # as jobs/*.py pass it
    assert build_parser().parse_args(["--log-level", "warning", "render", "a", "b"]).log_level == "WARNING"
    out = run_cli("--log-level", "verbose", "render", "a", "b")
    assert out.returncode == 2 and "invalid choice: 'VERBOSE'" in out.stderr and "Traceback" not in out.stderr


def test_out_of_range_sizes_fail_before_any_work(tmp_path, capsys):
    from mdland.detector.model import ARCHS, STARNet
    from mdland.detector.checkpoint import save_checkpoint

    for flag, value, message in [("--styles", "0", "argument --styles: must be at least 1, got 0"),
                                 ("--styles", "26", "styles: at most 25"),
                                 ("--epochs", "0", "argument --epochs: must be at least 1, got 0")]:
        assert exit_code("demo", "--storage", str(tmp_path / "data"), "--out", str(tmp_path / "r"), flag, value) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "data").exists() and not (tmp_path / "r").exists()
    save_checkpoint(STARNet(ARCHS["tiny"]), str(tmp_path / "d.pkl"))
    assert exit_code("evaluate", "--detector", str(tmp_path / "d.pkl"), "--data", str(tmp_path), "--batch-size",
                     "0", "--out", str(tmp_path / "eval")) == 2
    assert "argument --batch-size: must be at least 1, got 0" in capsys.readouterr().err
    # Numbers the parser refuses, naming the option, where they failed deep inside (--size 0: a traceback).
    for args, message in [(["ingest", "--format", "artface", "a", "b", "--size", "0"], "--size: must be at least 1"),
                          (["ingest", "--format", "artface", "a", "b", "--margin", "-1"],
                           "--margin: must be a finite number above 0, got -1"),
                          (["evaluate-preds", "a", "b", "--threshold", "10"],
                           "--threshold: must be a fraction in (0, 1] (0.10 for 10%), got 10"),
                          (["serve", "--detector", "d.pkl", "--port", "99999"],
                           "--port: must be a TCP port (1-65535), got 99999")]:
        assert exit_code(*args) == 2
        assert message in capsys.readouterr().err


def test_serve_on_a_port_in_use_is_a_one_line_error(tmp_path):
    import socket

    from mdland.detector.checkpoint import save_checkpoint
    from mdland.detector.model import ARCHS, STARNet

    save_checkpoint(STARNet(ARCHS["tiny"]), str(tmp_path / "d.pkl"))
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        out = run_cli("serve", "--detector", str(tmp_path / "d.pkl"), "--port", str(port))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"mdland serve: error: cannot listen on 127.0.0.1:{port}: Address already in use; another server has it "
        "(pick another with --port)"]


@pytest.mark.parametrize("moment,stop", [("starting", "SIGINT"), ("serving", "SIGINT"), ("serving", "SIGTERM")])
def test_serve_stops_cleanly_on_ctrl_c_or_sigterm(tmp_path, moment, stop, serve_cli):
    import signal

    import requests

    from mdland.detector.checkpoint import save_checkpoint
    from mdland.detector.model import ARCHS, STARNet

    save_checkpoint(STARNet(ARCHS["tiny"]), str(tmp_path / "d.pkl"))
    # While serve.run waits for the replica, or once the app is up.
    marker = "Deploying new version of Deployment" if moment == "starting" else "Ctrl-C stops"
    proc, lines, port = serve_cli(str(tmp_path / "d.pkl"), marker, "--set", "max_batch_size=2", "--set",
                                  "decode_threads=1")
    if moment == "serving":
        model = requests.get(f"http://127.0.0.1:{port}/v1/model", timeout=30).json()
        assert model["max_batch_size"] == 2  # both --set options applied
    proc.send_signal(getattr(signal, stop))  # SIGTERM: `kill`, `ray job stop`
    proc.wait(timeout=120)
    output = "".join(lines)
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output and "SIGTERM received" not in output
    assert "\nstopped\n" in output

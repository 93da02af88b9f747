import json
import subprocess
import sys
from pathlib import Path

import yaml
from PIL import Image


def test_demo_runs_the_whole_pipeline_at_its_smallest_setting(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "mdland", "demo", "--out", str(tmp_path / "report"), "--storage", str(tmp_path / "data"),
         "--train", "8", "--test", "4", "--steps", "2", "--styles", "1", "--images-per-style", "4", "--epochs", "1"],
        capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    for step in range(1, 9):
        assert f"[{step}/8]" in out.stderr
    report = tmp_path / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["generated"]["count"] == 4 and summary["served"]["status"] == 200
    names = [r["name"] for r in summary["metrics"]]
    assert names == ["procedural-test", "procedural-test (mean-shape baseline)"]
    assert all(r["count"] == 4 for r in summary["metrics"])
    html = (report / "index.html").read_text()
    for picture in ("samples.png", "edits.png", "ced.png", "stage1-loss.png", "stage2-loss.png",
                    "stage2-validation.png", "detector-loss.png", "overlays-procedural-test.png"):
        assert picture in html
        with Image.open(report / picture) as im:
            assert im.size[0] > 50, picture
    # The data went through the storage layer: real faces, the synthetic set, the runs.
    for folder in ("real-train", "real-test", "multi-domain", "synthetic"):
        assert (tmp_path / "data" / folder / "manifest.json").is_file()
    # The shipped tiny configs train on what the demo writes to demo-data/.
    shipped = Path(__file__).parents[1] / "mdland"
    for config in ("diffusion/configs/tiny-stage1.yaml", "diffusion/configs/tiny-stage2.yaml",
                   "detector/configs/tiny.yaml"):
        cfg = yaml.safe_load((shipped / config).read_text())
        for data in [cfg["data"]] if isinstance(cfg["data"], str) else cfg["data"]:
            assert (tmp_path / "data" / data.removeprefix("demo-data/") / "manifest.json").is_file(), (config, data)
    assert (tmp_path / "data" / "runs" / "stage2" / "controlnet" / "config.json").is_file()
    assert "| procedural-test | 4 |" in out.stdout


def test_demo_never_wipes_storage_it_did_not_write(tmp_path, capsys):
    from mdland.cli import main

    real = tmp_path / "bucket" / "synthetic"
    real.mkdir(parents=True)
    (real / "shard-000000.parquet").write_bytes(b"someone's synthetic set")
    assert main(["demo", "--storage", str(tmp_path / "bucket"), "--out", str(tmp_path / "report")]) == 2
    assert "holds files the demo did not write" in capsys.readouterr().err
    assert (real / "shard-000000.parquet").read_bytes() == b"someone's synthetic set"

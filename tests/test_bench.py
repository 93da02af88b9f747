import json

from mdland.cli import main


def test_bench_train_runs_both_loops_on_the_same_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("MDLAND_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    assert main(["bench", "train", "--preset", "tiny", "--batch-size", "2", "--resolution", "64", "--steps", "2",
                 "--warmup", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["plain_samples_per_s"] > 0 and result["mdland_samples_per_s"] > 0
    assert abs(result["speedup"] - result["mdland_samples_per_s"] / result["plain_samples_per_s"]) < 0.05
    assert result["device"].startswith("cpu") and result["baseline"].startswith("plain PyTorch loop")

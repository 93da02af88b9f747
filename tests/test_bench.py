import json

import pytest
import torch

from mdland.cli import main
from mdland.cluster import init_ray


def test_bench_train_runs_both_loops_on_the_same_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("MDLAND_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    assert main(["bench", "train", "--preset", "tiny", "--batch-size", "2", "--resolution", "64", "--steps", "2",
                 "--rounds", "2", "--warmup", "1", "--profile", str(tmp_path / "prof" / "train"), "--out",
                 str(out)]) == 0
    result = json.loads(out.read_text())
    table = (tmp_path / "prof" / "train.txt").read_text()
    assert table.startswith("3 calls") and "aten::convolution" in table  # the step's operators, by their time
    assert (tmp_path / "prof" / "train.json.gz").stat().st_size > 1000
    assert result["plain_samples_per_s"] > 0 and result["mdland_samples_per_s"] > 0
    assert abs(result["speedup"] - result["mdland_samples_per_s"] / result["plain_samples_per_s"]) < 0.05
    example = result["diffusers_example_samples_per_s"]
    assert example > 0 and abs(result["speedup_vs_diffusers_example"] - result["mdland_samples_per_s"] / example) < 0.05
    assert result["device"].startswith("cpu") and result["baseline"].startswith("plain PyTorch loop")
    assert result["rounds"] == 2
    assert all(result[f"{c}_warmup_s"] > 0 for c in ("plain", "diffusers_example", "mdland"))


def test_bench_generate_compares_sampler_stock_and_pipeline(tmp_path, monkeypatch):
    import ray

    monkeypatch.setenv("MDLAND_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "gen.json"
    init_ray(num_cpus=4, include_dashboard=False)
    try:
        assert main(["bench", "generate", "--preset", "tiny", "--batch-size", "4", "--resolution", "64", "--steps",
                     "3", "--repeats", "1", "--rounds", "2", "--pipeline", "--pipeline-images", "50", "--profile", str(tmp_path / "gen"),
                     "--channels-last", "--out", str(out)]) == 0
    finally:
        ray.shutdown()
    r = json.loads(out.read_text())
    assert r["stock_images_per_s"] > 0 and r["mdland_images_per_s"] > 0 and r["pipeline_images_per_s"] > 0
    assert r["stock_warmup_s"] > 0 and r["mdland_warmup_s"] > 0
    assert abs(r["speedup"] - r["mdland_images_per_s"] / r["stock_images_per_s"]) < 0.05
    assert "aten::convolution" in (tmp_path / "gen.txt").read_text()
    assert r["channels_last"] is False  # asked for, but applied on a GPU only, as the pipeline's actors do
    # Both figures are rounded from the same unrounded rate.
    assert r["projected_10k_images_min"] == pytest.approx(10_000 / r["pipeline_images_per_s"] / 60, abs=0.06)


def test_bench_detector(tmp_path):
    out = tmp_path / "det.json"
    assert main(["bench", "detector", "--arch", "tiny", "--batch-size", "4", "--repeats", "2", "--warmup", "1",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["batched_images_per_s"] > 0 and 0 < r["single_image_p50_ms"] <= r["single_image_p95_ms"]


def test_bench_serve_runs_http_against_in_process(tmp_path):
    import ray

    out = tmp_path / "serve.json"
    init_ray(num_cpus=4, include_dashboard=False)
    try:
        assert main(["bench", "serve", "--arch", "tiny", "--batch-size", "4", "--requests", "16", "--clients", "4",
                     "--replicas", "2", "--out", str(out)]) == 0
    finally:
        ray.shutdown()
    r = json.loads(out.read_text())
    assert r["errors"] == 0 and r["http_requests_per_s"] > 0 and r["in_process_images_per_s"] > 0
    # From the unrounded rates: within the rounding of the three numbers.
    assert r["ratio"] == pytest.approx(r["http_requests_per_s"] / r["in_process_images_per_s"], abs=2e-3)
    assert 0 < r["p50_ms"] <= r["p95_ms"]
    assert 1 <= r["mean_batch_size"] <= 4  # as the replica's answers said
    assert r["replicas_running"] == 2 and r["ingress"] == "haproxy"
    # Ray's 4 CPUs split between the 2 replicas: 2 torch threads each, as the baseline process has this machine's.
    assert r["torch_threads"]["replica"] == 2 and r["torch_threads"]["in_process"] == torch.get_num_threads()


def test_bench_write_assembles_every_shard(tmp_path):
    import pyarrow.parquet as pq

    out, shards = tmp_path / "write.json", tmp_path / "shards"
    assert main(["bench", "write", "--images", "noise", "--count", "80", "--rows-per-shard", "32", "--batch-size", "16",
                 "--output", str(shards), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    files = sorted(shards.glob("*.parquet"))
    assert r["shards_written"] == len(files) == 3
    assert [pq.read_metadata(f).num_rows for f in files] == [32, 32, 16]
    assert r["png_kib"] > 150  # noise does not compress: ~192 KiB of pixels per 256x256 image
    assert r["assembler_images_per_s"] > 0 and r["encode_images_per_s_per_core"] > 0
    # Both are rounded from the same unrounded rate, so they may differ in the last digit.
    assert r["h100s_at_32_images_per_s"] == pytest.approx(r["assembler_images_per_s"] / 32, abs=0.06)
    # A folder that holds anything (a real set, or this run's shards) is refused, and left as it was.
    before = {f: f.read_bytes() for f in files}
    assert main(["bench", "write", "--count", "16", "--rows-per-shard", "16", "--batch-size", "16",
                 "--output", str(shards)]) == 2
    assert {f: f.read_bytes() for f in sorted(shards.glob("*.parquet"))} == before


def test_bench_arch_is_checked(capsys):
    assert main(["bench", "detector", "--arch", "foo"]) == 2
    assert "unknown detector architecture 'foo'" in capsys.readouterr().err


def test_contenders_are_timed_in_turns():
    from mdland.bench import _interleaved

    calls = []
    seconds = _interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2, 3,
                           torch.device("cpu"))
    assert calls == ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]  # in turns, each round rotated
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())

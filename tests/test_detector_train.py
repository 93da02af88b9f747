import dataclasses
import io
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from mdland.cluster import init_ray
from mdland.data import storage
from mdland.data.procedural import procedural_faces, write_faces
from mdland.data.shards import ShardWriter
from mdland.detector.checkpoint import load_detector, save_checkpoint
from mdland.detector.model import ARCHS, STARNet
from mdland.detector.train import (DetectorTrainConfig, check_config, moving_average, run_training,
                                   update_moving_average)

TINY = dict(arch="tiny", batch_size=8, learning_rate=1e-3, log_every=4)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    write_faces(str(root / "train"), 64, seed=0, size=96)
    write_faces(str(root / "val"), 16, seed=0, size=96, start=10_000)
    return root


def history(checkpoint: str) -> list[dict]:
    return json.loads(storage.read_bytes(storage.join(checkpoint, "history.json")))


def read_blob(uri: str) -> dict:
    return torch.load(io.BytesIO(storage.read_bytes(uri)), weights_only=True)


def distance(a: dict, b: dict) -> float:
    return sum(float((a[k] - b[k]).norm()) for k in a if a[k].is_floating_point())


def test_the_moving_average_follows_stars_update():
    torch.manual_seed(0)
    net = STARNet(ARCHS["tiny"])
    ema = moving_average(net)
    assert not any(p.requires_grad for p in ema.parameters()) and not ema.training
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for v in net.state_dict().values():
            v.add_(2.0) if v.is_floating_point() else v.fill_(7)
    update_moving_average(ema, net, decay=0.75)
    for k, v in ema.state_dict().items():
        if v.is_floating_point():  # 0.75 * old + 0.25 * (old + 2): weights and BatchNorm statistics alike
            torch.testing.assert_close(v, start[k] + 0.5, msg=k)
        else:  # BatchNorm's step counters are copied, as STAR's trainer does
            assert torch.equal(v, torch.full_like(v, 7)), k
    restored = moving_average(net, ema.state_dict())
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in restored.state_dict().items())


def test_bad_configs_fail_fast(faces, tmp_path):
    def check(**kw):
        base = dict(TINY, data=[str(faces / "train")], storage_path=str(tmp_path))
        return check_config(DetectorTrainConfig(**{**base, **kw}))

    assert check() == (64, 64)  # faces, and the tiny network's input size
    with pytest.raises(ValueError, match="data: no training dataset given"):
        check(data=[])
    with pytest.raises(ValueError, match=r"all be local or all in S3 .*; got s3://b/synthetic \(s3\), .*train \(local\)"):
        check(data=["s3://b/synthetic", str(faces / "train")])
    with pytest.raises(ValueError, match=r"batch_size: 40 x 2 worker\(s\) is larger than the training set"):
        check(batch_size=40, num_workers=2)
    with pytest.raises(ValueError, match="unknown detector architecture"):
        check(arch="resnet")
    with pytest.raises(ValueError, match="ema_half_life: a number of faces, 0 for no average, got -1"):
        check(ema_half_life=-1)
    for rate in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="learning_rate: a positive number, got"):
            check(learning_rate=rate)
    for field in ("epochs", "batch_size", "keep_checkpoints"):
        with pytest.raises(ValueError, match=f"{field}: must be at least 1, got 0"):
            check(**{field: 0})
    ShardWriter(str(tmp_path / "empty")).close()
    assert check(val_data=[str(faces / "val"), str(faces / "val")]) == (64, 64)  # one held-out set per domain
    with pytest.raises(ValueError, match=r"data: .*empty is an empty dataset"):  # a wrong path among several
        check(data=[str(faces / "train"), str(tmp_path / "empty")])
    with pytest.raises(ValueError, match=r"val_data: .*empty holds no faces"):
        check(val_data=[str(faces / "val"), str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="nope.pkl: detector checkpoint not found"):
        check(init=str(tmp_path / "nope.pkl"))


def test_plain_process_learns_keeps_the_best_and_resumes(faces, tmp_path):
    cfg = DetectorTrainConfig(**TINY, data=[str(faces / "train")], val_data=[str(faces / "val")], epochs=3,
                              storage_path=str(tmp_path), name="d")
    first = run_training(cfg, local=True)
    cfg.epochs = 4
    (tmp_path / "d" / "checkpoint_000020").mkdir()  # copied before a run was cut short, never in latest.json
    (tmp_path / "d" / "checkpoint_000020" / "detector.pkl").write_bytes(b"part")
    second = run_training(cfg, local=True)
    hist = history(second["checkpoint"])
    assert [r["epoch"] for r in hist if r.get("resumed")] == [3]  # resumed after epoch 3, not restarted
    hist = [r for r in hist if not r.get("resumed")]
    assert [r["epoch"] for r in hist] == [0, 1, 2, 3, 4]
    # 8 steps an epoch; like Ray Train's num_to_keep, the plain process keeps the latest keep_checkpoints (3).
    assert sorted(p.name for p in (tmp_path / "d").glob("checkpoint_*")) == [f"checkpoint_{s:06d}" for s in (16, 24, 32)]
    nmes = [r["val_nme"] for r in hist]
    assert nmes[-1] < nmes[0] - 0.1, nmes  # validation NME falls measurably from the random start
    best = load_detector(second["best"])
    assert best.arch == ARCHS["tiny"]
    # Each epoch validates the weights and their moving average; the best of all is kept, saying which it is.
    scores = {(r["epoch"], k): r[key] for r in hist[1:] for k, key in (("net", "val_nme"), ("ema", "val_nme_ema"))}
    (epoch, kind), lowest = min(scores.items(), key=lambda kv: kv[1])
    blob = read_blob(second["best"])
    assert (blob["epoch"], blob["averaged"], blob["val_nme"]) == (epoch, kind == "ema", pytest.approx(lowest))
    assert first["epoch"] == 3
    # The resumed run went on from the average it had saved (not a new one from the weights): 8 steps at decay
    # 0.5^(8/10000) move it 0.4% of the way to the weights.
    before = read_blob(first["checkpoint"] + "/detector.pkl")
    after = read_blob(second["checkpoint"] + "/detector.pkl")
    assert distance(after["net_ema"], before["net_ema"]) < 0.02 * distance(before["net"], before["net_ema"])
    # `mdland evaluate` finds the same NME: it predicts on whole images and maps the points back to their pixels,
    # where validation compares in crop pixels (NME does not change with the crop's scale and shift).
    from mdland.detector.evaluate import evaluate_detector

    rows = evaluate_detector(second["best"], [("val", str(faces / "val"), None)], str(tmp_path / "eval"))
    assert rows[0]["nme"] == pytest.approx(blob["val_nme"], rel=1e-4)


def test_the_average_is_kept_when_it_validates_better(faces, tmp_path):
    base = DetectorTrainConfig(**TINY, data=[str(faces / "train")], val_data=[str(faces / "val")], epochs=3,
                               storage_path=str(tmp_path), name="base", ema_half_life=0)
    trained = run_training(base, local=True)
    assert "net_ema" not in read_blob(trained["best"])  # no average kept
    start = history(trained["checkpoint"])[-1]["val_nme"]
    # Fine-tuning on mirrored labels (left and right swapped) spoils the weights within two epochs; their average
    # (half-life 10,000 faces) stays near the start.
    writer = ShardWriter(str(tmp_path / "mirrored"), 64)
    for face in procedural_faces(64, seed=0, size=96):
        x = face.landmarks[:, 0]
        writer.add(dataclasses.replace(face, landmarks=np.stack([2 * x.mean() - x, face.landmarks[:, 1]], axis=1)))
    writer.close()
    tuned = run_training(replace(base, data=[str(tmp_path / "mirrored")], init=trained["best"], name="tuned",
                                 epochs=2, ema_half_life=10_000), local=True)
    records = history(tuned["checkpoint"])[1:]
    assert records[-1]["val_nme"] > start + 0.05, (start, records)
    assert all(r["val_nme_ema"] < start + 0.01 for r in records), (start, records)
    best = min(records, key=lambda r: r["val_nme_ema"])
    blob = read_blob(tuned["best"])
    assert (blob["averaged"], blob["epoch"], blob["val_nme"]) == (True, best["epoch"], pytest.approx(best["val_nme_ema"]))
    saved = read_blob(str(tmp_path / "tuned" / f"checkpoint_{best['step']:06d}" / "detector.pkl"))
    assert all(torch.equal(v, saved["net_ema"][k]) for k, v in blob["net"].items())
    from mdland.detector.evaluate import evaluate_detector

    rows = evaluate_detector(tuned["best"], [("val", str(faces / "val"), None)], str(tmp_path / "eval"))
    assert rows[0]["nme"] == pytest.approx(best["val_nme_ema"], rel=1e-4)


def test_fine_tuning_a_finished_checkpoint_starts_at_epoch_zero(faces, tmp_path):
    # A checkpoint that had trained 500 epochs: the new run still trains its own epochs (STAR's trainer would not).
    torch.manual_seed(3)
    net = STARNet(ARCHS["tiny"])
    save_checkpoint(net, str(tmp_path / "done.pkl"), epoch=500)
    cfg = DetectorTrainConfig(**TINY, init=str(tmp_path / "done.pkl"), data=[str(faces / "train")], epochs=1,
                              storage_path=str(tmp_path), name="ft")
    result = run_training(cfg, local=True)
    assert result["epoch"] == 1 and result["step"] == 64 // 8
    assert os.path.exists(result["best"])  # no validation data: the latest epoch is the best known
    tuned = load_detector(storage.join(result["checkpoint"], "detector.pkl"))
    assert not torch.equal(tuned.state_dict()["pre.0.conv.weight"], net.state_dict()["pre.0.conv.weight"])


def test_bf16_training_keeps_fp32_weights_and_batchnorm_statistics(faces, tmp_path):
    # bf16 is what GPUs train in (an autocast); it runs on CPU too, so the path is tested here.
    cfg = DetectorTrainConfig(**TINY, precision="bf16", data=[str(faces / "train")], val_data=[str(faces / "val")],
                              epochs=1, storage_path=str(tmp_path), name="bf16")
    result = run_training(cfg, local=True)
    blob = read_blob(result["best"])
    weights = blob["net"]
    assert all(v.dtype == torch.float32 for k, v in weights.items() if not k.endswith("num_batches_tracked"))
    # fp32 weights, not a bf16 working copy: values bf16 cannot hold.
    assert sum(not torch.equal(v, v.bfloat16().float()) for v in weights.values() if v.is_floating_point()) > 100
    # BatchNorm's running statistics too: in bf16 their updates would round away once near the batch statistics.
    stats = [v for k, v in weights.items() if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 50 and sum(not torch.equal(v, v.bfloat16().float()) for v in stats) > 0.9 * len(stats)
    assert 0 < blob["val_nme"] < 1
    with pytest.raises(ValueError, match="precision: unknown precision 'fp8'"):
        check_config(DetectorTrainConfig(**TINY, precision="fp8", data=[str(faces / "train")]))


def test_ray_train_two_workers_lower_validation_nme(faces, tmp_path):
    import ray

    init_ray(num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"MDLAND_CACHE": os.environ.get("MDLAND_CACHE", "")}})
    try:
        cfg = DetectorTrainConfig(**TINY, data=[str(faces / "train")], val_data=[str(faces / "val")], epochs=3,
                                  num_workers=2, storage_path=str(tmp_path), name="ray-d")
        result = run_training(cfg)
        # Resuming with another number of workers is refused before any worker starts, saying what to do instead
        # (DeepSpeed's own error comes mid-load and names neither).
        with pytest.raises(ValueError, match=r"checkpoint_\d+ was written by 2 worker\(s\) and this run has 1.*"
                                             r"num_workers=2, or start a new run .* with `init`"):
            run_training(replace(cfg, num_workers=1, epochs=4))
        # A plain-process run of the same name would not resume from Ray Train's checkpoints: refused.
        with pytest.raises(ValueError, match=r"ray-d holds the checkpoints of a run on Ray Train"):
            run_training(replace(cfg, epochs=4), local=True)
        # GPU workers on this machine's GPU-less Ray: refused at once (Ray Train would wait for them for ever).
        with pytest.raises(ValueError, match=r"use_gpu: the run needs 2 GPU\(s\) and the Ray cluster has 0 "
                                             r"\(a local Ray on this machine\)"):
            run_training(replace(cfg, use_gpu=True, name="ray-gpu"))
    finally:
        ray.shutdown()
    hist = history(result["checkpoint"])
    nmes = [r["val_nme"] for r in hist]
    assert [r["epoch"] for r in hist] == [0, 1, 2, 3] and nmes[-1] < nmes[0] - 0.05, nmes
    # Rank 0 keeps the average of the two workers' shared weights: validated each epoch and saved.
    assert all(0 < r["val_nme_ema"] < 1 for r in hist[1:])
    assert set(read_blob(os.path.join(result["checkpoint"], "detector.pkl"))["net_ema"]) == set(
        STARNet(ARCHS["tiny"]).state_dict())
    names = os.listdir(os.path.join(result["checkpoint"], "epoch3"))
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(names)
    assert os.path.exists(result["best"])


def test_the_engine_runs_its_own_bf16_autocast_over_fp32_weights():
    # DeepSpeed switches off an autocast around its forward on GPU, so the engine must run its own.
    from mdland.session import deepspeed_engine, set_single_process_env

    set_single_process_env()
    torch.manual_seed(0)
    engine = deepspeed_engine(STARNet(ARCHS["tiny"]), batch_size=2, optimizer={"type": "Adam", "lr": 1e-3},
                              zero_stage=1, dtype=torch.float32, on_gpu=False, autocast=torch.bfloat16)
    out = engine(torch.randn(2, 3, 64, 64))
    assert out.fusionmaps[-1].dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    assert all(b.dtype == torch.float32 for n, b in engine.module.named_buffers() if "running" in n)
    assert not engine.tput_timer.config.enabled  # it would wait for the device twice a step

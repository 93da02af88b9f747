import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from PIL import Image

from mdland.cluster import init_ray
from mdland.data import storage
from mdland.data.shards import decode_image, landmarks_array, read_dataset, read_manifest, shard_name
from mdland.data.storage import StorageError
from mdland.data.procedural import write_faces
from mdland.diffusion.models import build_controlnet, build_preset, ddim_scheduler
from mdland.generation.pipeline import _check_plan, run_generation
from mdland.generation.plan import (DEFAULT_STYLES, GenerateConfig, load_styles, plan_sample, render_conditions,
                                    shard_rows, source_landmarks)
from mdland.generation.sampler import LandmarkSampler, to_uint8
from mdland.landmarks.edits import EDITS
from mdland.landmarks.render import draw_landmarks, render_landmarks

STYLES = ["cartoon", "anime", "clay"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Source faces and a tiny ControlNet export whose zero convolutions are not zero, so it adds to the UNet."""
    root = tmp_path_factory.mktemp("gen")
    write_faces(str(root / "src"), 6, seed=0, size=64)
    torch.manual_seed(1)
    controlnet = build_controlnet(build_preset("tiny"))
    for p in controlnet.parameters():
        p.data += 0.01 * torch.randn_like(p)
    controlnet.save_pretrained(root / "controlnet")
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MDLAND_CACHE", str(tmp_path_factory.getbasetemp() / "mdland-cache"))


def config(inputs, output, **kw) -> GenerateConfig:
    base = dict(source=[str(inputs / "src")], output=output, controlnet=str(inputs / "controlnet"), styles=STYLES,
                images_per_style=8, resolution=64, num_inference_steps=4, rows_per_shard=10, batch_size=4)
    return GenerateConfig(**{**base, **kw})


def test_plan_is_a_pure_balanced_function_of_the_config(inputs):
    assert len(load_styles(DEFAULT_STYLES)) == 25
    cfg = config(inputs, "unused")
    styles = load_styles(cfg.styles_file, cfg.styles)
    landmarks = source_landmarks(cfg)
    np.testing.assert_allclose(landmarks, landmarks_array(read_dataset(cfg.source[0])), atol=1e-5)  # 64 px in and out
    a, b = shard_rows(cfg, 1, styles, landmarks), shard_rows(cfg, 1, styles, landmarks)
    assert [r["index"] for r in a] == list(range(10, 20))
    for x, y in zip(a, b):
        assert x["seed"] == y["seed"] and np.array_equal(x["landmarks"], y["landmarks"])
        names = x["edits"].split(",")
        assert len(names) == 2 and len(set(names)) == 2 and set(names) <= set(EDITS)
        assert (x["landmarks"] >= 0).all() and (x["landmarks"] <= 63).all()
    drawn = render_conditions({"landmarks": [x["landmarks"] for x in a], "seed": np.array([x["seed"] for x in a])}, 64)
    assert drawn["condition"].shape == (10, 64, 64, 3) and list(drawn["seed"]) == [x["seed"] for x in a]
    for x, condition in zip(a, drawn["condition"]):
        assert np.array_equal(render_landmarks(x["landmarks"], 64), condition)
    firsts = [plan_sample(0, i, 3, 6)[0] for i in range(6)]
    assert sorted(firsts) == [0, 0, 1, 1, 2, 2]  # any prefix is balanced across styles
    assert len({plan_sample(0, i, 3, 6)[2] for i in range(1000)}) == 1000
    assert plan_sample(1, 5, 3, 6) != plan_sample(0, 5, 3, 6)


def test_several_sources_are_one_pool_of_landmark_sets(inputs, tmp_path):
    from mdland.data.procedural import write_faces

    write_faces(str(tmp_path / "big"), 4, seed=9, size=128)  # another domain, stored at another size
    cfg = config(inputs, "unused", source=[str(inputs / "src"), str(tmp_path / "big")], images_per_style=40)
    pool = source_landmarks(cfg)
    small = landmarks_array(read_dataset(str(inputs / "src")))
    big = landmarks_array(read_dataset(str(tmp_path / "big")))
    assert pool.shape == (len(small) + len(big), 68, 2)
    np.testing.assert_allclose(pool[len(small):], (big + 0.5) * 64 / 128 - 0.5, atol=1e-4)  # in output pixels
    rows = [r for k in range(cfg.num_shards) for r in shard_rows(cfg, k, load_styles(cfg.styles_file, cfg.styles),
                                                                   pool)]
    assert {r["source_row"] >= len(small) for r in rows} == {True, False}  # samples drawn from both
    assert config(inputs, "unused", source=[str(tmp_path / "big"), str(inputs / "src")]).plan_identity() != \
        cfg.plan_identity()  # the order of the sources is part of the plan


def stock_images(c, controlnet, conditions: np.ndarray, prompts: list[str], seeds: list[int], steps: int,
                 **options) -> np.ndarray:
    """What diffusers' StableDiffusionControlNetPipeline draws from the same modules and seeds (64 px, guidance 7.5)."""
    from diffusers import StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, controlnet=controlnet,
        scheduler=ddim_scheduler(c), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompts, image=[Image.fromarray(x) for x in conditions], height=64, width=64,
                num_inference_steps=steps, guidance_scale=7.5, output_type="np",
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], **options).images


def test_sampler_matches_the_stock_pipeline_and_samples_stand_alone(inputs):
    from diffusers import ControlNetModel

    c = build_preset("tiny")
    controlnet = ControlNetModel.from_pretrained(inputs / "controlnet")
    cfg = config(inputs, "unused")
    rows = shard_rows(cfg, 0, load_styles(cfg.styles_file, cfg.styles),
                      landmarks_array(read_dataset(cfg.source[0])))[:3]
    conditions = np.stack([render_landmarks(r["landmarks"], 64) for r in rows])
    prompts, seeds = [r["prompt"] for r in rows], [r["seed"] for r in rows]
    stock = stock_images(c, controlnet, conditions, prompts, seeds, 5)
    sampler = LandmarkSampler(c, controlnet, num_inference_steps=5, guidance_scale=7.5, vae_batch_size=2)
    ours = sampler(conditions, prompts, seeds)
    assert np.abs(ours - stock).max() < 1e-4
    alone = sampler(conditions[2:], prompts[2:], seeds[2:])
    assert np.abs(alone[0] - ours[2]).max() < 1e-4
    fused = LandmarkSampler(build_preset("tiny"), ControlNetModel.from_pretrained(inputs / "controlnet"),
                            num_inference_steps=5, guidance_scale=7.5, fuse_qkv=True)
    assert np.abs(fused(conditions, prompts, seeds) - ours).max() < 1e-4

    # With eta > 0 each sample's step noise comes from its own generator, as in the stock pipeline.
    stock = stock_images(c, controlnet, conditions, prompts, seeds, 5, eta=0.7)
    noisy = LandmarkSampler(c, controlnet, num_inference_steps=5, guidance_scale=7.5, eta=0.7)
    assert np.abs(noisy(conditions, prompts, seeds) - stock).max() < 1e-4
    assert np.abs(noisy(conditions[2:], prompts[2:], seeds[2:])[0] - stock[2]).max() < 1e-4
    # SD 1.x's DDIM: the last step goes to alpha_cumprod[0], not to 1.
    scheduler = ddim_scheduler(c)
    assert scheduler.final_alpha_cumprod == scheduler.alphas_cumprod[0]


def test_sampler_embeds_each_condition_once_in_either_channel_order(inputs):
    from diffusers import ControlNetModel

    c = build_preset("tiny")
    rows = shard_rows(config(inputs, "unused"), 0, load_styles(DEFAULT_STYLES, STYLES),
                      landmarks_array(read_dataset(str(inputs / "src"))))[:2]
    conditions = np.stack([render_landmarks(r["landmarks"], 64) for r in rows])
    prompts, seeds = [r["prompt"] for r in rows], [r["seed"] for r in rows]
    rgb = ControlNetModel.from_pretrained(inputs / "controlnet")
    with torch.no_grad():  # zero convolutions far from zero, so the condition's channel order shows in the images
        for name, p in rgb.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.mul_(30)
    bgr = ControlNetModel.from_config({**rgb.config, "controlnet_conditioning_channel_order": "bgr"})
    bgr.load_state_dict(rgb.state_dict())
    images = {}
    for name, controlnet in (("rgb", rgb), ("bgr", bgr)):
        embedded = []
        controlnet.controlnet_cond_embedding.register_forward_hook(lambda m, i, o: embedded.append(len(i[0])))
        sampler = LandmarkSampler(c, controlnet, num_inference_steps=3, guidance_scale=7.5)
        images[name] = sampler(conditions, prompts, seeds)
        assert embedded == [2]  # once for the call's two images: not twice at each of the 3 steps
        stock = stock_images(c, controlnet, conditions, prompts, seeds, 3)  # the ControlNet has its embedding back
        assert np.abs(images[name] - stock).max() < 1e-4
    assert np.abs(images["rgb"] - images["bgr"]).max() > 5e-4  # 5x the tolerance: a wrong flip would show


def test_actors_get_whole_batches(inputs):
    import ray

    from mdland.generation.pipeline import conditioned_rows

    # 24 samples: shards of 10, 10 and 4, planned for GPU actors (nothing here runs on a GPU).
    cfg = config(inputs, "unused", rows_per_shard=10, batch_size=4, use_gpu=True)
    init_ray(num_cpus=2, include_dashboard=False)
    context = ray.data.DataContext.get_current()
    limit = context.target_max_block_size
    # Blocks of 2.5 rows' worth of conditions: Ray would cut them anywhere (as it cuts a real shard's ~200 MB).
    context.target_max_block_size = int(2.5 * 64 * 64 * 3)
    try:
        ds = conditioned_rows(cfg, [0, 1, 2], load_styles(cfg.styles_file, cfg.styles), source_landmarks(cfg))
        blocks = [b["index"] for b in ds.iter_batches(batch_size=None)]
    finally:
        context.target_max_block_size = limit
        ray.shutdown()
    # Whole batches, across shard boundaries (the assemblers route rows by shard): only the run's last may be short.
    assert [len(b) for b in blocks] == [4] * 6 and sorted(np.concatenate(blocks)) == list(range(24))


def test_generate_into_s3(inputs, s3_bucket):
    import ray

    out = f"{s3_bucket}/synthetic"
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
                                      "MDLAND_CACHE")}
    init_ray(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env})
    try:
        cfg = config(inputs, out, num_assemblers=2)  # shards 0 and 2 meet in one, shard 1 in the other
        start = time.time()
        result = run_generation(cfg)
        took = time.time() - start
        assert (result["complete"], result["count"], result["total"]) == (True, 24, 24)
        # Overall images/s: at least 24 over the whole call, which also planned and wrote the manifest and preview.
        assert 24 / took <= result["images_per_s"] < 24 / (0.5 * took)
    finally:
        ray.shutdown()
    assert storage.list_files(out, ".parquet") == [f"{out}/{shard_name(k)}" for k in range(3)]
    manifest = read_manifest(out)
    assert manifest["count"] == 24 and manifest["styles"] == {s: 8 for s in STYLES} and manifest["complete"]
    assert manifest["weights"] == {"controlnet": storage.fingerprint(cfg.controlnet),
                                   "source": [storage.fingerprint(cfg.source[0])]}
    table = read_dataset(out)
    keys = table.column("key").to_pylist()
    assert keys == [f"synthetic-0-{i:09d}" for i in range(24)]
    preview = np.asarray(Image.open(io.BytesIO(storage.read_bytes(f"{out}/preview.png"))))
    assert preview.shape == (3 * 66 + 2, 5 * 66 + 2, 3)  # a row per style: its name, then its first 4 faces
    assert (preview[70:130, 2:66] < 128).any()  # the name is written
    # Row 1, first face: sample 1 (sample i has style i mod 3), with its landmarks drawn.
    first = table.slice(1, 1)
    np.testing.assert_array_equal(preview[68:132, 68:132], draw_landmarks(
        decode_image(first.column("image")[0].as_py()), landmarks_array(first)[0]))
    assert len(set(table.column("seed").to_pylist())) == 24
    assert set(table.column("source").to_pylist()) == {"synthetic"}
    assert set(table.column("model").to_pylist()) == {f"{cfg.controlnet}@{storage.fingerprint(cfg.controlnet)}"}
    assert all(len(e) == 2 for e in table.column("edits").to_pylist())
    points = landmarks_array(table)
    assert (points >= 0).all() and (points <= 63).all()
    # Regenerate one sample alone, from what its row says: the same pixels as the stored image.
    from diffusers import ControlNetModel

    row = 13
    sampler = LandmarkSampler(build_preset("tiny"), ControlNetModel.from_pretrained(inputs / "controlnet"),
                              num_inference_steps=4, guidance_scale=7.5)
    again = to_uint8(sampler(render_landmarks(points[row], 64)[None], [table.column("prompt")[row].as_py()],
                             [table.column("seed")[row].as_py()]))[0]
    stored = decode_image(table.column("image")[row].as_py())
    assert stored.shape == (64, 64, 3)
    diff = np.abs(again.astype(int) - stored.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_killed_run_then_rerun_gives_exactly_the_plan(inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative output path: Ray's workers run elsewhere and must still find it
    out = "out"
    cfg = config(inputs, out, images_per_style=12, rows_per_shard=3, num_inference_steps=30, batch_size=3,
                 styles=STYLES, num_assemblers=3)  # 36 samples in 12 shards
    overrides = [f"{k}={json.dumps(v)}" for k, v in cfg.__dict__.items() if v is not None]
    proc = subprocess.Popen([sys.executable, "-m", "mdland", "generate", "--set", *overrides],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.isdir(out) and any(f.endswith(".parquet") for f in os.listdir(out))):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out) if f.endswith(".parquet")}
    assert 0 < len(before) < 12, f"kill landed at {len(before)} shards"
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    import ray

    init_ray(num_cpus=4, include_dashboard=False)
    try:
        assert run_generation(cfg)["complete"]
    finally:
        ray.shutdown()
    for name, data in before.items():  # shards finished before the kill are left as they were
        assert open(os.path.join(out, name), "rb").read() == data
    keys = read_dataset(out).column("key").to_pylist()
    assert sorted(keys) == [f"synthetic-0-{i:09d}" for i in range(36)]  # no duplicates, no gaps
    assert read_manifest(out)["count"] == 36


def test_bad_inputs_fail_clearly_and_damage_nothing(inputs, tmp_path, s3_bucket):
    with pytest.raises(ValueError, match="nope.yaml: styles file not found"):
        run_generation(config(inputs, str(tmp_path / "o"), styles_file=str(tmp_path / "nope.yaml")))
    with pytest.raises(ValueError, match=r"unknown style\(s\) \['sculpture'\]"):
        run_generation(config(inputs, str(tmp_path / "o"), styles=["sculpture"]))
    from mdland.data.shards import ShardWriter

    ShardWriter(str(tmp_path / "empty")).close()
    with pytest.raises(ValueError, match="is an empty dataset"):
        run_generation(config(inputs, str(tmp_path / "o"), source=[str(inputs / "src"), str(tmp_path / "empty")]))
    with pytest.raises(StorageError, match="the bucket does not exist"):
        run_generation(config(inputs, "s3://mdland-missing-bucket/out"))
    with pytest.raises(ValueError, match="not a ControlNet export"):
        run_generation(config(inputs, str(tmp_path / "o"), controlnet=str(tmp_path)))
    for name in ("num_assemblers", "num_actors", "rows_per_shard", "num_inference_steps"):
        with pytest.raises(ValueError, match=f"{name}: must be at least 1, got 0"):
            run_generation(config(inputs, str(tmp_path / "o"), **{name: 0}))
    for settings, message in [({"edits_per_sample": 9}, "edits_per_sample: between 1 and 8"),
                              ({"seed": -1}, "seed: must not be negative"),
                              ({"resolution": 36}, "resolution: must be a multiple of 64"),
                              ({"edit_strength": float("nan")}, "edit_strength: must be a finite number"),
                              ({"guidance_scale": -2.0}, "guidance_scale: must be a finite number"),
                              ({"dtype": "float8"}, "dtype: expected float16 or bfloat16"),
                              ({"compile_mode": "max-autotune"}, "compile_mode: 'max-autotune' is for compiled runs"),
                              ({"compile": True, "compile_mode": "fast"}, "compile_mode: one of default, "),
                              ({"max_shards": -1}, "max_shards: must be at least 1, got -1"),
                              ({"model": "sd15"}, r"controlnet: .* was made from another UNet than model sd15's "
                                                  r"\(block_out_channels \[32, 64\] against \(320, 640, 1280, 1280\)\)")]:
        with pytest.raises(ValueError, match=message):
            run_generation(config(inputs, str(tmp_path / "o"), **settings))
    assert not (tmp_path / "o").exists()  # each failed before writing anything
    with pytest.raises(ValueError, match="empty is an empty dataset"):
        run_generation(config(inputs, str(tmp_path / "o"), source=[str(tmp_path / "empty")]))
    for nothing in ([], [""]):
        with pytest.raises(ValueError, match="source: no source dataset given"):
            run_generation(config(inputs, str(tmp_path / "o"), source=nothing))
    # An output folder that holds another plan is refused before anything is written to it.
    out = tmp_path / "taken"
    out.mkdir()
    (out / "plan.json").write_text(json.dumps({"seed": 99}))
    (out / "shard-000000.parquet").write_bytes(b"earlier work")
    with pytest.raises(ValueError, match="holds a different plan"):
        run_generation(config(inputs, str(out)))
    assert (out / "shard-000000.parquet").read_bytes() == b"earlier work"
    assert sorted(os.listdir(out)) == ["plan.json", "shard-000000.parquet"]
    # A folder holding a dataset no generation run planned (here, the source itself) is not taken over.
    source = inputs / "src"
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    with pytest.raises(ValueError, match=f"output: {source} holds a dataset that no generation run planned"):
        run_generation(config(inputs, str(source)))
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    # The same plan with a ControlNet re-exported at the same path: other weights, so another plan.
    controlnet = tmp_path / "controlnet"
    shutil.copytree(inputs / "controlnet", controlnet)
    planned = config(inputs, str(tmp_path / "o"), controlnet=str(controlnet))
    _check_plan(planned)
    config_file = controlnet / "config.json"
    config_file.write_text(config_file.read_text() + " ")
    # No shard written yet: the new plan replaces the old (a launch that wrote nothing fixes nothing).
    replaced = _check_plan(planned)
    assert json.loads((tmp_path / "o" / "plan.json").read_text()) == replaced
    # An actor loads the weights the plan names, and refuses an export re-published after the plan was made.
    from mdland.generation.pipeline import GenerationActor

    from diffusers import ControlNetModel

    actor = GenerationActor(asdict(planned), replaced["weights"])
    export = ControlNetModel.from_pretrained(controlnet).state_dict()
    loaded = actor.sampler.controlnet.state_dict()
    assert loaded.keys() == export.keys() and all(torch.equal(loaded[k], export[k]) for k in export)
    config_file.write_text(config_file.read_text() + " ")
    with pytest.raises(ValueError, match=f"controlnet: {controlnet} changed after this run planned"):
        GenerationActor(asdict(planned), replaced["weights"])
    (tmp_path / "o" / "shard-000000.parquet").write_bytes(b"earlier work")
    config_file.write_text(config_file.read_text() + " ")
    with pytest.raises(ValueError, match=r"differs in \['weights'\]"):  # with a shard written, the plan is fixed
        _check_plan(planned)
    # The same for a source re-ingested at the same path: the planned rows would take other landmark sets.
    source = tmp_path / "source"
    shutil.copytree(inputs / "src", source)
    planned = config(inputs, str(tmp_path / "p"), source=[str(source)])
    _check_plan(planned)
    (tmp_path / "p" / "shard-000000.parquet").write_bytes(b"earlier work")
    manifest = source / "manifest.json"
    manifest.write_text(manifest.read_text() + " ")
    with pytest.raises(ValueError, match=r"differs in \['weights'\]"):
        _check_plan(planned)
    # fp16 and bf16 draw other images: a folder sampled in one is not continued in the other.
    half = config(inputs, str(tmp_path / "half"), use_gpu=True)
    ident = _check_plan(half)
    (tmp_path / "half" / "shard-000000.parquet").write_bytes(b"earlier work")
    assert _check_plan(half) == ident
    with pytest.raises(ValueError, match=r"differs in \['precision'\]"):
        _check_plan(replace(half, dtype="bfloat16"))


def test_alignment_scores_and_filter(inputs, tmp_path, caplog):
    import logging

    import ray

    from mdland.detector.checkpoint import save_checkpoint
    from mdland.detector.model import ARCHS, STARNet

    torch.manual_seed(0)
    save_checkpoint(STARNet(ARCHS["tiny"]), str(tmp_path / "det.pkl"))
    init_ray(num_cpus=4, include_dashboard=False)
    try:
        scored = config(inputs, str(tmp_path / "scored"), detector=str(tmp_path / "det.pkl"))
        run_generation(scored)
        scores = read_dataset(scored.output).column("alignment").to_numpy()
        assert len(scores) == 24 and np.isfinite(scores).all() and (scores > 0).all()
        threshold = float(np.quantile(scores, 0.25))  # about 6 of 24 kept: fewer than a full preview
        filtered = config(inputs, str(tmp_path / "filtered"), detector=str(tmp_path / "det.pkl"),
                          min_alignment=threshold)
        caplog.set_level(logging.INFO, logger="mdland")
        logging.getLogger("mdland").addHandler(caplog.handler)  # mdland's logger does not propagate to caplog's
        try:
            result = run_generation(filtered)
            # A threshold no pair meets: a complete, empty set, and no preview of nothing (the run does not fail on
            # it), with a warning saying why.
            empty = run_generation(config(inputs, str(tmp_path / "empty"), detector=str(tmp_path / "det.pkl"),
                                          min_alignment=0.0))
        finally:
            logging.getLogger("mdland").removeHandler(caplog.handler)
        # GPU actors on this machine's GPU-less Ray: refused at once (Ray Data would wait for them for ever).
        with pytest.raises(ValueError, match=r"use_gpu: the run needs 2 GPU\(s\) and the Ray cluster has 0 "
                                             r"\(a local Ray on this machine\)"):
            run_generation(config(inputs, str(tmp_path / "gpu"), use_gpu=True, num_actors=2))
    finally:
        ray.shutdown()
    assert (empty["complete"], empty["count"]) == (True, 0) and not (tmp_path / "empty" / "preview.png").exists()
    kept = read_dataset(filtered.output)
    said = {(r.levelname, r.getMessage()) for r in caplog.records if "dropped" in r.getMessage()}
    assert said == {("INFO", f"min_alignment {threshold:g} dropped {24 - kept.num_rows} of the 24 samples (the "
                             "`alignment` column of an unfiltered run shows the scores)"),
                    ("WARNING", "min_alignment 0 dropped 24 of the 24 samples (the `alignment` column of an "
                                "unfiltered run shows the scores)")}
    assert any(f"samples of this run ({kept.num_rows} images kept by min_alignment)" in r.getMessage()
               for r in caplog.records)
    by_key = dict(zip(read_dataset(scored.output).column("key").to_pylist(), scores))
    assert 0 < kept.num_rows < 24 and result["count"] == kept.num_rows
    assert read_manifest(filtered.output)["planned"] == 24
    # Exactly the pairs scored at or under the threshold are kept, with their scores.
    assert set(kept.column("key").to_pylist()) == {k for k, score in by_key.items() if score <= threshold}
    for key, score in zip(kept.column("key").to_pylist(), kept.column("alignment").to_numpy()):
        assert score == pytest.approx(by_key[key], rel=1e-5)
    # The preview shows what is left of each style, and blank tiles for the rest of its row.
    preview = np.asarray(Image.open(tmp_path / "filtered" / "preview.png"))
    blank = [(preview[2 + r * 66: 66 + r * 66, 2 + c * 66: 66 + c * 66] == 255).all()
             for r in range(3) for c in (1, 2, 3, 4)]
    styles = kept.column("style").to_pylist()
    assert sum(blank) == sum(max(0, 4 - styles.count(s)) for s in STYLES) > 0
    with pytest.raises(ValueError, match="min_alignment: needs a detector"):
        run_generation(config(inputs, str(tmp_path / "x"), min_alignment=0.1))


def test_assembler_counts_a_row_delivered_twice_once(inputs, tmp_path, monkeypatch):
    from mdland.data.shards import encode_image
    from mdland.generation.pipeline import ShardAssembler

    cfg = config(inputs, str(tmp_path / "out"), styles=["cartoon"], images_per_style=3, rows_per_shard=3)
    assembler = ShardAssembler(asdict(cfg), total=3, weights=cfg.plan_identity()["weights"])

    def rows(indices):
        n = len(indices)
        return {"index": np.array(indices), "shard": np.zeros(n, np.int64), "alignment": np.full(n, np.nan),
                "landmarks": [np.full((68, 2), 20.0 + i, np.float32) for i in indices],
                "image": [encode_image(np.full((64, 64, 3), i, np.uint8)) for i in indices],
                "key": np.array([f"{i:08d}" for i in indices]), "prompt": np.array(["p"] * n),
                "style": np.array(["cartoon"] * n), "edits": np.array(["chubby"] * n),
                "edit_params": np.array(["[]"] * n), "seed": np.array(indices)}

    assert len(assembler.add(rows([0, 1]))["shard"]) == 0
    assert len(assembler.add(rows([1]))["shard"]) == 0  # a retried task's duplicate: still two distinct rows
    first = assembler.add(rows([2]))
    assert list(first["shard"]) == [0] and json.loads(first["summary"][0])["rows"] == 3
    # The completing delivery retried (its answer lost with the task): the shard is reported again, not rewritten.
    mtime = os.stat(tmp_path / "out" / shard_name(0)).st_mtime_ns
    again = assembler.add(rows([2]))
    assert list(again["shard"]) == [0] and list(again["summary"]) == list(first["summary"])
    # Another delivery of the shard's rows again after it was written: not written twice, not reported, none held.
    assert len(assembler.add(rows([0, 1, 2]))["shard"]) == 0 and not assembler.rows
    assert os.stat(tmp_path / "out" / shard_name(0)).st_mtime_ns == mtime
    table = read_dataset(str(tmp_path / "out"))
    assert table.column("key").to_pylist() == ["00000000", "00000001", "00000002"]
    # A failed shard write is tried again after a pause (here the outage ends in the first one)...
    import mdland.generation.pipeline as pipeline

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output folder should be")
    monkeypatch.setattr(pipeline.time, "sleep", lambda seconds: blocked.unlink())
    assembler = ShardAssembler(asdict(replace(cfg, output=str(blocked))), total=3,
                               weights=cfg.plan_identity()["weights"])
    assert list(assembler.add(rows([0, 1, 2]))["shard"]) == [0] and (blocked / shard_name(0)).exists()
    # ...and a shard whose writes all fail keeps its rows: the retried delivery of its last row writes it whole.
    shutil.rmtree(blocked)
    blocked.write_text("a file where the output folder should be")
    pauses = []
    monkeypatch.setattr(pipeline.time, "sleep", pauses.append)
    assembler = ShardAssembler(asdict(replace(cfg, output=str(blocked))), total=3,
                               weights=cfg.plan_identity()["weights"])
    with pytest.raises(OSError):
        assembler.add(rows([0, 1, 2]))
    assert pauses == [1, 2, 4, 8] and len(assembler.rows[0]) == 3
    blocked.unlink()
    assert list(assembler.add(rows([2]))["shard"]) == [0]
    assert read_dataset(str(blocked)).num_rows == 3

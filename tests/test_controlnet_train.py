import json
import os
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from mdland.cluster import init_ray
from mdland.config import load_config
from mdland.data import storage
from mdland.data.shards import Face, ShardWriter, encode_image, read_dataset, read_shard, shard_uris
from mdland.data.procedural import write_faces
from mdland.diffusion.models import build_controlnet, build_preset, save_components
from mdland.diffusion.data import COLUMNS, prepare_batch
from mdland.diffusion.train import ControlNetTrainConfig, _with_prompts, check_config, probe_batch, run_training

TINY = dict(model="tiny", resolution=64, batch_size=2, learning_rate=1e-3, log_every=2, num_validation=2,
            validation_steps=2)


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("faces") / "train")
    write_faces(root, 8, seed=0, size=64)
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MDLAND_CACHE", str(tmp_path_factory.getbasetemp() / "mdland-cache"))


def history(uri: str) -> list[dict]:
    return json.loads(storage.read_bytes(storage.join(uri, "history.json")))


def probe_losses(hist: list[dict]) -> list[float]:
    return [r["probe_loss"] for r in hist if "probe_loss" in r]


def test_bad_configs_fail_fast(tmp_path, faces_dir):
    def check(**kw):
        return check_config(ControlNetTrainConfig(**{**TINY, "data": [faces_dir], "storage_path": str(tmp_path), **kw}))

    assert check() == 8
    assert check(data=[faces_dir, faces_dir]) == 16  # several datasets, e.g. one per domain
    assert load_config(ControlNetTrainConfig, None, [f"data={faces_dir}"]).data == [faces_dir]
    with pytest.raises(ValueError, match=r"model: .*no-model is neither a preset \(tiny, sd15\) nor a diffusers-format"):
        check(model=str(tmp_path / "no-model"))
    with pytest.raises(ValueError, match="unknown preset 'sd2'"):
        check(model="sd2")
    with pytest.raises(ValueError, match="unknown stage"):
        check(stage="stage3")
    with pytest.raises(ValueError, match=r"batch_size: 5 x 2 worker\(s\) is larger than the training set \(8 faces"):
        check(batch_size=5, num_workers=2)
    ShardWriter(str(tmp_path / "empty")).close()
    with pytest.raises(ValueError, match="is an empty dataset"):
        check(data=[str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="nothing-here: not found"):
        check(data=[str(tmp_path / "nothing-here")])
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "face.png").write_bytes(b"an image, not a shard")
    with pytest.raises(ValueError, match="raw: no shards .*`mdland ingest` makes a dataset of a folder"):
        check(data=[str(tmp_path / "raw")])
    with pytest.raises(ValueError, match=r"all be local or all in S3.*s3://bucket/faces \(s3\)"):
        check(data=[faces_dir, "s3://bucket/faces"])  # before any storage is read
    with pytest.raises(ValueError, match="not a ControlNet export"):
        check(controlnet=str(tmp_path))
    # A ControlNet made from another UNet (its residuals would not fit): refused before any worker starts.
    from diffusers import ControlNetModel

    from mdland.diffusion.models import build_preset

    other = build_preset("tiny").unet.config
    ControlNetModel.from_unet(build_preset("tiny").unet).save_config(tmp_path / "fits")
    assert check(controlnet=str(tmp_path / "fits")) == 8
    wider = json.loads((tmp_path / "fits" / "config.json").read_text()) | {"cross_attention_dim": 48}
    (tmp_path / "wider").mkdir()
    (tmp_path / "wider" / "config.json").write_text(json.dumps(wider))
    with pytest.raises(ValueError, match=rf"wider was made from another UNet than model tiny's \(cross_attention_dim "
                                         rf"48 against {other.cross_attention_dim}\)"):
        check(controlnet=str(tmp_path / "wider"))
    with pytest.raises(ValueError, match="resolution: must be a multiple of 64"):
        check(resolution=100)
    with pytest.raises(ValueError, match="learning_rate: a positive number, got -1"):
        check(learning_rate=-1.0)
    with pytest.raises(ValueError, match="bf16 training needs ZeRO stage 1 or 2"):
        check(precision="bf16", zero_stage=0)
    with pytest.raises(ValueError, match="zero_stage: 3 is not supported"):
        check(zero_stage=3)
    with pytest.raises(ValueError, match="stage 2 starts from stage 1's export"):
        check(stage="stage2")
    unstyled = ShardWriter(str(tmp_path / "unstyled"))
    unstyled.add(Face(image=encode_image(np.zeros((64, 64, 3), np.uint8)), landmarks=np.full((68, 2), 30.0), key="a"))
    unstyled.close()
    (tmp_path / "cn").mkdir()
    (tmp_path / "cn" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="every prompt in .*unstyled is empty"):
        check(stage="stage2", controlnet=str(tmp_path / "cn"), data=[str(tmp_path / "unstyled")], batch_size=1)
    (tmp_path / "c.yaml").write_text("stage: stage1\nbatch_sise: 4\n")
    with pytest.raises(ValueError, match=r"c.yaml: unknown key\(s\) \['batch_sise'\]"):
        load_config(ControlNetTrainConfig, tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="max_steps: expected int"):
        load_config(ControlNetTrainConfig, None, ["max_steps=many"])
    for field, value, message in [("validation_steps", 0, "validation_steps: must be at least 1"),
                                  ("validation_steps", 1001, "validation_steps: at most SD's 1000"),
                                  ("num_validation", 0, "num_validation: must be at least 1"),
                                  ("keep_checkpoints", -1, "keep_checkpoints: must be at least 1"),
                                  ("empty_prompt_share", 1.5, "empty_prompt_share: a share between 0 and 1")]:
        with pytest.raises(ValueError, match=message):
            check(**{field: value})


def test_a_model_directory_of_fp16_weights_only_loads(tmp_path):
    from mdland.diffusion.models import load_components

    tiny = build_preset("tiny", seed=3)
    save_components(tiny, tmp_path / "plain")
    for sub in ("vae", "unet", "text_encoder"):  # as `--include '*fp16*'` downloads them
        getattr(tiny, sub).half().save_pretrained(tmp_path / "plain" / sub, variant="fp16")
        for f in (tmp_path / "plain" / sub).iterdir():
            if f.suffix == ".safetensors" and ".fp16" not in f.name:
                f.unlink()
    loaded = load_components(str(tmp_path / "plain"))
    expected = tiny.unet.state_dict()
    for name, value in loaded.unet.state_dict().items():
        torch.testing.assert_close(value.float(), expected[name].float(), rtol=0, atol=0)


def test_casting_a_model_logs_no_empty_keep_in_fp32_warning():
    import logging

    from mdland.log import _listed_fp32_modules, setup_logging

    logger = logging.getLogger("diffusers.models.modeling_utils")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    vae = build_preset("tiny").vae
    try:
        setup_logging()
        vae.to("cpu", torch.float32)
        logger.warning("another diffusers warning")
        assert seen == ["another diffusers warning"]  # only the empty list's warning is dropped
        logger.removeFilter(_listed_fp32_modules)
        vae.to("cpu", torch.float32)  # diffusers' own: at every cast
        assert "should be kept in float32: []" in seen[-1]
    finally:
        logger.removeHandler(handler)
        setup_logging()


def test_sampling_never_clips_latents_whatever_the_scheduler_config_leaves_out(tmp_path):
    from diffusers import DDPMScheduler

    from mdland.diffusion.models import ddim_scheduler

    tiny = build_preset("tiny")
    config = {k: v for k, v in tiny.noise_scheduler.config.items() if k != "clip_sample" and not k.startswith("_")}
    tiny.noise_scheduler = DDPMScheduler.from_config(config)  # an older export: DDPM's default clips
    assert tiny.noise_scheduler.config.clip_sample is True
    assert ddim_scheduler(tiny).config.clip_sample is False


def test_prompts_pad_to_the_text_encoders_positions_when_the_tokenizer_sets_no_length():
    from mdland.diffusion.models import PromptEmbeddings

    tiny = build_preset("tiny")
    expected = PromptEmbeddings(tiny, "cpu")(["a painting", ""])
    tiny.tokenizer.model_max_length = int(1e30)  # what a tokenizer config without model_max_length gives
    torch.testing.assert_close(PromptEmbeddings(tiny, "cpu")(["a painting", ""]), expected)
    assert expected.shape[1] == tiny.text_encoder.config.max_position_embeddings


def test_probe_batch_is_the_datas_first_faces_in_file_order(tmp_path, faces_dir):
    small = str(tmp_path / "small-shards")
    write_faces(small, 5, seed=3, size=64, rows_per_shard=2)
    data = [small, faces_dir]
    first_shard = read_shard(shard_uris(small)[0])
    probe = probe_batch(ControlNetTrainConfig(**{**TINY, "batch_size": 4, "data": data}), first_shard)
    first = read_dataset(small).slice(0, 4)  # across the first two shards
    expected = prepare_batch({c: first.column(c).to_pylist() for c in COLUMNS}, 64)
    assert probe["image"].shape == (4, 3, 64, 64)
    np.testing.assert_array_equal(probe["image"], expected["image"])
    np.testing.assert_array_equal(probe["condition"], expected["condition"])
    wide = probe_batch(ControlNetTrainConfig(**{**TINY, "batch_size": 7, "data": data}), first_shard)
    rest = read_dataset(faces_dir).slice(0, 2)  # the five faces, then the next dataset's first two
    np.testing.assert_array_equal(wide["image"][5:], prepare_batch({c: rest.column(c).to_pylist() for c in COLUMNS},
                                                                   64)["image"])


def test_prompts_by_stage():
    batch = {"prompt": np.array(["a portrait of cartoon style"] * 200, dtype=object)}
    rng = np.random.default_rng(0)
    assert set(_with_prompts(batch, ControlNetTrainConfig(stage="stage1"), rng)["prompt"]) == {""}
    out = _with_prompts(batch, ControlNetTrainConfig(stage="stage2", empty_prompt_share=0.25), rng)["prompt"]
    blank = sum(p == "" for p in out)
    assert 25 < blank < 75 and set(out) == {"", "a portrait of cartoon style"}


def test_plain_process_overfits_resumes_exports_and_feeds_stage2(tmp_path, faces_dir):
    runs = str(tmp_path / "runs")
    cfg = ControlNetTrainConfig(**TINY, data=[faces_dir], max_steps=16, checkpoint_every=8, storage_path=runs, name="s1")
    first = run_training(cfg, local=True)
    assert first["step"] == 16 and first["checkpoint"].endswith("checkpoint_000016")
    # Raising the budget resumes at the saved step rather than starting again or stopping as finished.
    cfg.max_steps = 30
    cfg.checkpoint_every = 15
    second = run_training(cfg, local=True)
    hist = history(second["checkpoint"])
    steps = [r["step"] for r in hist if "loss" in r]
    assert steps == list(range(2, 31, 2))  # one unbroken run of steps: 2..16 from the first, 18..30 resumed
    probes = probe_losses(hist)
    assert probes[-1] < probes[0] * 0.9, probes  # the fixed batch is being fitted
    for name in ("controlnet/config.json", "validation.png", "loss.png"):
        assert storage.exists(storage.join(second["checkpoint"], name)), name

    # The export loads into diffusers' own pipeline with the tiny SD parts and generates.
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
    from PIL import Image

    sd_dir = tmp_path / "tiny-sd"
    save_components(build_preset("tiny"), sd_dir)
    controlnet = ControlNetModel.from_pretrained(second["export"])
    pipe = StableDiffusionControlNetPipeline.from_pretrained(sd_dir, controlnet=controlnet, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    image = pipe("", image=Image.new("RGB", (64, 64)), height=64, width=64, num_inference_steps=2,
                 output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()

    # Stage 2 starts from stage 1's export (same weights at step 0) and trains with prompts, from a model dir.
    components = build_preset("tiny")
    start = build_controlnet(components, second["export"])
    for (name, a), b in zip(controlnet.state_dict().items(), start.state_dict().values()):
        assert torch.equal(a, b), name
    stage2 = ControlNetTrainConfig(**{**TINY, "model": str(sd_dir)}, stage="stage2", controlnet=second["export"],
                                   data=[faces_dir], max_steps=4, checkpoint_every=4, storage_path=runs, name="s2")
    result = run_training(stage2, local=True)
    moved = ControlNetModel.from_pretrained(result["export"]).state_dict()
    assert any(not torch.equal(moved[k], v) for k, v in controlnet.state_dict().items())


def test_bf16_training_with_accumulation_exports_fp32_master_weights_and_resumes(tmp_path, faces_dir):
    from diffusers import ControlNetModel

    cfg = ControlNetTrainConfig(**TINY, precision="bf16", gradient_accumulation=2, data=[faces_dir], max_steps=2,
                                checkpoint_every=2, storage_path=str(tmp_path / "runs"), name="bf16")
    result = run_training(cfg, local=True)
    weights = ControlNetModel.from_pretrained(result["export"]).state_dict()
    assert all(v.dtype == torch.float32 for v in weights.values())
    # The optimizer's fp32 master copy went out, not the module's bf16 working weights.
    assert sum(not torch.equal(v, v.bfloat16().float()) for v in weights.values()) > 50
    assert history(result["checkpoint"])[-1]["probe_loss"] > 0
    # A step is two micro-batches: DeepSpeed counted 2 optimizer steps over 2 x 2 x batch samples.
    state = torch.load(os.path.join(result["checkpoint"], "step2", "mp_rank_00_model_states.pt"), weights_only=False)
    assert state["global_steps"] == 2 and state["global_samples"] == 2 * 2 * TINY["batch_size"]
    # Ray Train would not resume from it: a Ray run of the same name is refused, not started over beside it.
    with pytest.raises(ValueError, match=r"bf16 holds the checkpoints of a run in one process \(--local\)"):
        run_training(replace(cfg, max_steps=3))
    # A bf16 run resumes from its ZeRO checkpoint (fp32 master weights and Adam state) at the saved step.
    cfg.max_steps = cfg.checkpoint_every = 3
    again = run_training(cfg, local=True)
    assert [(r["step"], "resumed" in r) for r in history(again["checkpoint"]) if "loss" in r or "resumed" in r] == [
        (2, False), (2, True), (3, False)]


def test_the_resume_check_reads_the_checkpoint_ray_resumes_from(tmp_path):
    from mdland.session import RAY_SNAPSHOT, check_resumable

    run = tmp_path / "run"

    def checkpoint(step: int, ranks: list[int], latest: bool = True, workers: int | None = None):
        folder = run / f"checkpoint_{step:06d}"
        (folder / f"step{step}").mkdir(parents=True)
        for r in ranks:
            (folder / f"step{step}" / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"state")
        if latest:
            (folder / "latest").write_text(f"step{step}")
        if workers:
            (folder / "workers.json").write_text(json.dumps({"workers": workers}))

    checkpoint(4, [0, 1], workers=2)
    with pytest.raises(ValueError, match=r"checkpoint_000004 was written by 2 worker\(s\) and this run has 1"):
        check_resumable(str(run), False, 1, "start over")
    checkpoint(8, [1], latest=False)  # rank 0's upload cut short: not a checkpoint Ray resumes from
    check_resumable(str(run), False, 2, "start over")
    checkpoint(12, [0], workers=2)  # rank 1's upload cut short: rank 0 recorded the count
    check_resumable(str(run), False, 2, "start over")
    with pytest.raises(ValueError, match=r"checkpoint_000012 was written by 2 worker\(s\) and this run has 1"):
        check_resumable(str(run), False, 1, "start over")
    checkpoint(16, [0, 1])  # rank 0's upload cut short after `latest`, before workers.json: still step 12's count
    with pytest.raises(ValueError, match=r"checkpoint_000012 was written by 2 worker\(s\) and this run has 1"):
        check_resumable(str(run), False, 1, "start over")
    # A plain-process run would not resume from Ray Train's checkpoints, nor start over beside them.
    (run / RAY_SNAPSHOT).write_text("{}")
    with pytest.raises(ValueError, match=r"run holds the checkpoints of a run on Ray Train.*resume it on Ray Train"):
        check_resumable(str(run), True, 1, "start over")


def test_bf16_engine_starts_its_master_copy_from_the_fp32_weights():
    from mdland.session import deepspeed_engine, master_weights, set_single_process_env

    set_single_process_env()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16))
    original = {k: v.clone() for k, v in net.state_dict().items()}
    engine = deepspeed_engine(net, batch_size=2, optimizer={"type": "Adam", "lr": 1e-3}, zero_stage=1,
                              dtype=torch.bfloat16, on_gpu=False)
    weights = master_weights(engine)
    for name in ("0.weight", "0.bias", "1.weight"):
        assert torch.equal(weights[name], original[name]), name
    assert engine.module[0].weight.dtype == torch.bfloat16
    assert not torch.equal(engine.module[0].weight.float(), original["0.weight"])  # only the working copy is rounded


def test_bf16_engine_accumulates_each_gradient_in_fp32_as_backward_makes_it():
    import copy

    from deepspeed.utils import safe_get_full_grad

    from mdland.session import deepspeed_engine, set_single_process_env

    set_single_process_env()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    reference = copy.deepcopy(net).to(torch.bfloat16)
    engine = deepspeed_engine(net, batch_size=4, accumulation=2, optimizer={"type": "Adam", "lr": 1e-3},
                              zero_stage=1, dtype=torch.bfloat16, on_gpu=False)
    expected = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in reference.named_parameters()}
    for _ in range(2):  # one accumulation window
        x = torch.randn(4, 16, dtype=torch.bfloat16)
        reference.zero_grad()
        reference(x).float().mean().backward()
        for n, p in reference.named_parameters():
            expected[n] += p.grad.float() / 2  # the engine scales each micro-batch's loss by 1 / accumulation
        engine.backward(engine(x).float().mean())
        assert all(p.grad is None for p in engine.module.parameters())  # held once, in fp32, not also in bf16
    for n, p in engine.module.named_parameters():
        torch.testing.assert_close(safe_get_full_grad(p), expected[n], rtol=0, atol=0)


def test_each_rank_and_resumed_step_draws_its_own_noise():
    from mdland.session import reseed

    draws = []
    for rank, step in ((0, 0), (1, 0), (0, 100), (0, 0)):
        reseed(7, rank, step)
        draws.append(torch.randn(4))
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert torch.equal(draws[0], draws[3])


def kill_a_worker_after(marker: str, killed: list) -> None:
    """Once `marker` exists (and Ray Train has had time to register the checkpoint it belongs to), SIGKILL one Ray
    Train worker process, as a lost node would; its pid goes into `killed`."""
    import psutil

    deadline = time.time() + 300
    while not storage.exists(marker):
        if time.time() > deadline:
            return
        time.sleep(0.2)
    time.sleep(5)  # Ray Train's controller polls its workers every 2 s: let it take the report in
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if (proc.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker"):
            proc.kill()
            killed.append(proc.pid)
            return


def test_ray_train_two_workers_checkpoints_to_s3_survive_a_lost_worker_and_resume(tmp_path, s3_bucket):
    import threading

    import ray

    data = f"{s3_bucket}/faces"
    write_faces(data, 8, seed=1, size=64)
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
                                      "MDLAND_CACHE")}
    init_ray(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env})
    try:
        cfg = ControlNetTrainConfig(**TINY, data=[data], max_steps=16, checkpoint_every=4, num_workers=2,
                                    cpus_per_worker=1, storage_path=f"{s3_bucket}/runs", name="ray-s1")
        killed = []
        killer = threading.Thread(target=kill_a_worker_after,
                                  args=(f"{s3_bucket}/runs/ray-s1/checkpoint_000004/history.json", killed),
                                  daemon=True)
        killer.start()
        first = run_training(cfg)
        killer.join()
        assert first["step"] == 16 and len(killed) == 1
        # FailureConfig restarted the workers from a checkpoint, not from step 0: one resume, and one unbroken run
        # of logged steps across it.
        ckpt = f"{s3_bucket}/runs/ray-s1/checkpoint_000016"
        hist = history(ckpt)
        resumed = [r["step"] for r in hist if r.get("resumed")]
        assert len(resumed) == 1 and 4 <= resumed[0] < 16 and resumed[0] % 4 == 0, resumed
        assert [r["step"] for r in hist if "loss" in r] == list(range(2, 17, 2))
        names = storage.list_files(ckpt) + storage.list_files(f"{ckpt}/step16")
        # DeepSpeed ZeRO-2 state from both ranks, merged into one checkpoint, plus rank 0's export and pictures.
        assert any(n.endswith("zero_pp_rank_0_mp_rank_00_optim_states.pt") for n in names)
        assert any(n.endswith("zero_pp_rank_1_mp_rank_00_optim_states.pt") for n in names)
        assert storage.exists(f"{ckpt}/controlnet/config.json") and storage.exists(f"{ckpt}/validation.png")
        assert json.loads(storage.read_bytes(f"{ckpt}/workers.json")) == {"workers": 2}
        cfg.max_steps = 20
        second = run_training(cfg)
        assert second["step"] == 20
        hist = history(f"{s3_bucket}/runs/ray-s1/checkpoint_000020")
        assert [r["step"] for r in hist if r.get("resumed")] == resumed + [16]
        assert [r["step"] for r in hist if "loss" in r] == list(range(2, 21, 2))
        probes = probe_losses(hist)
        assert probes[-1] < probes[0], probes
        assert storage.exists(f"{s3_bucket}/runs/ray-s1/controlnet/diffusion_pytorch_model.safetensors")
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_compiled_training_matches_eager_and_exports_plain_weights(tmp_path, faces_dir):
    from functools import partial

    from diffusers import ControlNetModel

    from mdland.data.datasets import local_epoch
    from mdland.diffusion.data import COLUMNS, prepare_batch
    from mdland.diffusion.models import PromptEmbeddings
    from mdland.diffusion.train import controlnet_engine, diffusion_loss
    from mdland.session import set_single_process_env

    set_single_process_env()
    batch = next(local_epoch([faces_dir], COLUMNS, partial(prepare_batch, resolution=64), 2, 0))
    losses = {}
    for compile in (False, True):
        components = build_preset("tiny")
        torch.manual_seed(0)
        engine = controlnet_engine(components, build_controlnet(components),
                                   ControlNetTrainConfig(**TINY, compile=compile), torch.device("cpu"), torch.float32)
        text = PromptEmbeddings(components, "cpu")
        losses[compile] = []
        for step in range(3):
            loss = diffusion_loss(components, engine, text, batch, torch.float32, torch.Generator().manual_seed(step))
            engine.backward(loss)
            engine.step()
            losses[compile].append(loss.item())
    # The compiled forward computes what eager mode does; training then follows the same course (Adam's first steps
    # move even zero-initialised weights by ~lr whatever the gradient's size, so float noise shows a little).
    assert losses[False][0] == pytest.approx(losses[True][0], rel=1e-5)
    assert np.allclose(losses[False], losses[True], rtol=2e-3), losses
    assert losses[True][0] != losses[True][1]

    # A whole compiled run (validation grid through diffusers' pipeline included) exports plain diffusers weights.
    result = run_training(ControlNetTrainConfig(**TINY, compile=True, data=[faces_dir], max_steps=2, checkpoint_every=2,
                                                storage_path=str(tmp_path / "runs"), name="compiled"), local=True)
    exported = ControlNetModel.from_pretrained(result["export"]).state_dict()
    assert list(exported) == list(build_controlnet(build_preset("tiny")).state_dict())


def test_training_noise_is_exact_for_bf16_latents():
    from diffusers import DDPMScheduler

    from mdland.diffusion.train import noised_latents

    # SD 1.x's schedule: at the first timesteps sqrt(1 - alphas_cumprod) is 0.03-0.07, which bf16 arithmetic rounds
    # to 0 or 0.0625. The forward process must hold exactly for every sample whatever the latents' dtype.
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latents = torch.randn(512, 4, 4, 4).to(torch.bfloat16)
    noisy, t, noise = noised_latents(scheduler, latents, torch.Generator().manual_seed(0))
    assert noisy.dtype == noise.dtype == torch.float32 and int(t.min()) < 10
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * latents.double() + (1 - alpha_bar).sqrt() * noise.double()
    torch.testing.assert_close(noisy.double(), expected, rtol=0, atol=1e-5)
    # SD 2.x-style v-prediction schedulers regress v = sqrt(a) * noise - sqrt(1 - a) * x0 on the same draw.
    v_scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="v_prediction")
    v_noisy, v_t, v = noised_latents(v_scheduler, latents, torch.Generator().manual_seed(0))
    assert torch.equal(v_t, t) and torch.equal(v_noisy, noisy)
    torch.testing.assert_close(v.double(), alpha_bar.sqrt() * noise.double() - (1 - alpha_bar).sqrt() * latents.double(),
                               rtol=0, atol=1e-5)
    scheduler = DDPMScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        noised_latents(scheduler, latents)


def test_cached_latents_give_the_loss_of_encoding_every_step(faces_dir):
    from functools import partial

    from mdland.data.datasets import local_epoch
    from mdland.diffusion.data import COLUMNS, LatentEncoder, conditions_from_points, prepare_targets
    from mdland.diffusion.models import PromptEmbeddings
    from mdland.diffusion.train import diffusion_loss

    targets = next(local_epoch([faces_dir], COLUMNS, partial(prepare_targets, resolution=64), 4, 0))
    encoded = LatentEncoder("tiny", seed=0, use_gpu=False, precision="auto")(targets)
    components = build_preset("tiny")
    with torch.no_grad():
        expected = components.vae.encode(torch.as_tensor(targets["image"]).float() / 127.5 - 1.0).latent_dist
    assert "image" not in encoded and encoded["latents"].dtype == np.float32
    np.testing.assert_allclose(encoded["latents"], expected.parameters.numpy(), atol=1e-5)
    torch.manual_seed(0)
    controlnet = build_controlnet(components)
    text = PromptEmbeddings(components, "cpu")

    def loss(batch: dict, seed: int) -> float:
        return diffusion_loss(components, controlnet, text, conditions_from_points(batch, 64), torch.float32,
                              torch.Generator().manual_seed(seed)).item()

    # The same generator draws the same latent from the stored distribution as from the VAE's, then the same noise.
    assert loss(encoded, 3) == pytest.approx(loss(targets, 3), rel=1e-4)
    assert loss(encoded, 3) != pytest.approx(loss(encoded, 4), rel=1e-3)


def test_ray_dataset_of_cached_latents_is_reshuffled_each_epoch(faces_dir):
    import ray

    from mdland.diffusion.data import ray_dataset

    init_ray(num_cpus=2, include_dashboard=False)
    try:
        ds = ray_dataset([faces_dir], 64, {"model": "tiny", "seed": 0, "use_gpu": False, "precision": "auto"},
                         workers=1)
        assert "LatentEncoder" not in str(ds)  # encoded already: epochs only shuffle and draw conditions
        epochs = [ds.take_all() for _ in range(2)]
        assert [len(e) for e in epochs] == [8, 8]
        assert set(epochs[0][0]) == {"latents", "condition", "prompt"}
        assert epochs[0][0]["condition"].shape == (3, 64, 64) and epochs[0][0]["condition"].dtype == np.uint8
        sums = [[float(r["latents"].sum()) for r in e] for e in epochs]
        assert sorted(sums[0]) == sorted(sums[1]) and sums[0] != sums[1]
        # Each face keeps its own condition through the shuffles.
        pairs = [{(round(float(r["latents"].sum()), 4), int(r["condition"].sum())) for r in e} for e in epochs]
        assert pairs[0] == pairs[1]
    finally:
        ray.shutdown()

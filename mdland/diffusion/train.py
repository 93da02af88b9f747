"""Stages 1 and 2 of the method: train the landmark ControlNet with Ray Train + DeepSpeed.

One `train_func` runs on every Ray Train worker (or alone, in one plain process, for debugging): frozen VAE, UNet and
text encoder (bf16 on GPU), a trainable ControlNet wrapped by DeepSpeed (ZeRO stage 2, stage 1 on a single rank; bf16
with fp32 master weights on GPU, fp32 on CPU), DDPM noise and an MSE loss on the noise; on Ray, latents sampled from
distributions the VAE computed once per run (`cache_latents`). Stage 1 trains with empty prompts; stage 2 starts from
stage 1's export and trains with style prompts, a share of them blanked so classifier-free guidance works.
Checkpoints (DeepSpeed state, a diffusers-format export of the fp32 master weights, a validation grid and the loss
curve) go to `storage_path/name/checkpoint_NNNNNN`; a re-run with the same name resumes from the latest one.
"""

import itertools
import json
import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from mdland.config import check_counts, check_learning_rate, from_dict
from mdland.data import storage
from mdland.data.shards import decode_image, landmarks_array, read_columns, read_shard, shard_uris
from mdland.data.datasets import check_training_data, local_epoch
from mdland.diffusion.data import COLUMNS, prepare_batch, ray_dataset
from mdland.diffusion.models import (PRESETS, PromptEmbeddings, SDComponents, build_controlnet,
                                     check_controlnet, check_model_dir, ddim_scheduler, latent_distribution,
                                     load_components)
from mdland.landmarks.align import resize_points
from mdland.landmarks.edits import fit_in_frame, sample_edits
from mdland.landmarks.render import draw_landmarks, image_grid, render_landmarks
from mdland.log import get_logger, setup_logging
from mdland.plots import plot_curves
from mdland.session import (LocalSession, RaySession, check_precision, check_resumable, deepspeed_engine,
                            endless, launch, master_weights, mean_over_ranks, pick_device, reseed, training_dtype)

log = get_logger(__name__)
STAGES = ("stage1", "stage2")


@dataclass
class ControlNetTrainConfig:
    data: list[str] = field(default_factory=list)  # shard datasets (local or s3://), e.g. one per domain in stage 2
    stage: str = "stage1"  # stage1: empty prompts; stage2: style prompts
    model: str = "tiny"  # a preset (tiny, sd15) or a diffusers-format SD 1.x directory (local or s3://)
    controlnet: str | None = None  # a ControlNet export to start from (stage 2: stage 1's); None: copy the UNet
    resolution: int = 256
    batch_size: int = 4  # per worker
    gradient_accumulation: int = 1
    learning_rate: float = 1e-5
    max_steps: int = 200_000  # optimizer steps
    empty_prompt_share: float = 0.1  # stage 2: share of prompts replaced by "" for classifier-free guidance
    checkpoint_every: int = 5000
    log_every: int = 50
    num_validation: int = 4
    validation_steps: int = 20  # DDIM steps for the validation grid
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 2
    precision: str = "auto"  # auto: bf16 on GPU (frozen parts in bf16, ControlNet bf16 + fp32 master), fp32 on CPU
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the ControlNet and the frozen UNet (GPU: fused kernels; slow first steps)
    # Ray Train runs: VAE-encode each face once per run, before training, and sample latents from the stored
    # distributions each step (the plain-process mode encodes every step)
    cache_latents: bool = True
    storage_path: str = "runs"  # local folder or s3://bucket/prefix
    name: str = "controlnet"
    keep_checkpoints: int = 3
    max_failures: int = 1
    seed: int = 0


def check_config(cfg: ControlNetTrainConfig) -> int:
    """Fail fast, before any worker starts, on a config that cannot train; returns the dataset's row count."""
    if cfg.stage not in STAGES:
        raise ValueError(f"stage: unknown stage {cfg.stage!r}; choose one of {STAGES}")
    if cfg.model not in PRESETS and "/" not in cfg.model and not Path(cfg.model).exists():
        raise ValueError(f"model: unknown preset {cfg.model!r}; choose one of {PRESETS} or give a model directory")
    check_model_dir(cfg.model)
    if cfg.controlnet:
        check_controlnet(cfg.controlnet, cfg.model)
    check_precision(cfg.precision, cfg.zero_stage, cfg.use_gpu)
    if cfg.resolution % 64:
        raise ValueError(f"resolution: must be a multiple of 64, got {cfg.resolution}")
    check_counts(cfg, ("batch_size", "gradient_accumulation", "max_steps", "checkpoint_every", "log_every",
                       "num_workers", "num_validation", "validation_steps", "keep_checkpoints"))
    check_learning_rate(cfg.learning_rate)
    if cfg.validation_steps > 1000:
        raise ValueError(f"validation_steps: at most SD's 1000 training timesteps, got {cfg.validation_steps}")
    if not 0 <= cfg.empty_prompt_share <= 1:
        raise ValueError(f"empty_prompt_share: a share between 0 and 1, got {cfg.empty_prompt_share}")
    rows = check_training_data(cfg.data, cfg.batch_size, cfg.num_workers)
    if cfg.stage == "stage2":
        if not cfg.controlnet:
            raise ValueError("controlnet: stage 2 starts from stage 1's export; give its path")
        if not any(p for d in cfg.data for p in read_columns(d, ["prompt"]).column("prompt").to_pylist()):
            raise ValueError(f"data: stage 2 trains with style prompts, but every prompt in {', '.join(cfg.data)} is "
                             "empty (ingest each domain with --style / --prompt)")
    storage.check_writable(storage.join(cfg.storage_path, cfg.name))
    return rows


def controlnet_engine(components: SDComponents, controlnet: ControlNetModel, cfg: ControlNetTrainConfig,
                      device: torch.device, dtype: torch.dtype):
    """The ControlNet under DeepSpeed (ZeRO `zero_stage`, AdamW, gradient clipping at 1 as in diffusers' example).
    On GPU the frozen UNet is channels-last, and `diffusion_loss` feeds both networks channels-last inputs: ZeRO
    re-points the ControlNet's weights into one flat buffer in the default layout, so for it the inputs are what
    select cuDNN's channels-last kernels (its weights are converted per call, a small copy next to the activations)."""
    on_gpu = device.type == "cuda"
    controlnet.to(device).train()
    if on_gpu:
        components.unet.to(memory_format=torch.channels_last)
    if cfg.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    if cfg.compile:
        # In place (nn.Module.compile), so state-dict keys and exports stay as they are.
        controlnet.compile()
        components.unet.compile()
    return deepspeed_engine(controlnet, batch_size=cfg.batch_size, accumulation=cfg.gradient_accumulation,
                            zero_stage=cfg.zero_stage, dtype=dtype, on_gpu=on_gpu, gradient_clipping=1.0,
                            optimizer={"type": "AdamW", "lr": cfg.learning_rate, "betas": (0.9, 0.999), "eps": 1e-8,
                                       "weight_decay": 1e-2})


def export_controlnet(engine, directory: str | Path) -> None:
    """A diffusers-format export (config.json + safetensors, what `save_pretrained` writes) of the fp32 master
    weights. Collective: every rank calls it; rank 0 writes."""
    from safetensors.torch import save_file

    weights = master_weights(engine)
    if engine.global_rank == 0:
        Path(directory).mkdir(parents=True, exist_ok=True)
        engine.module.save_config(directory)
        save_file({k: v.contiguous() for k, v in weights.items()},
                  str(Path(directory) / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def diffusion_loss(components: SDComponents, controlnet: torch.nn.Module, text: PromptEmbeddings, batch: dict,
                   dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """The ControlNet training loss of one batch: noise a VAE latent, predict the noise with UNet + ControlNet.
    The latent is sampled from the batch's cached `latents` distributions if it has them, else from encoding its
    `image` (the same draw for the same generator)."""
    device = text.device
    # uint8 over the host-device link, scaled on the device: target in [-1, 1], condition in [0, 1].
    cond = (torch.as_tensor(batch["condition"]).to(device, non_blocking=True).float() / 255.0).to(dtype)
    scheduler = components.noise_scheduler
    with torch.no_grad():
        if "latents" in batch:
            dist = DiagonalGaussianDistribution(torch.as_tensor(batch["latents"]).to(device, dtype))
        else:
            dist = latent_distribution(components.vae, torch.as_tensor(batch["image"]).to(device, non_blocking=True),
                                       dtype)
        latents = dist.sample(generator) * components.vae.config.scaling_factor
        hidden = text(list(batch["prompt"]))
    noisy, t, target = noised_latents(scheduler, latents, generator)
    noisy = noisy.to(dtype)
    if device.type == "cuda":  # the layout cuDNN's fastest convolutions use (see controlnet_engine)
        noisy = noisy.contiguous(memory_format=torch.channels_last)
        cond = cond.contiguous(memory_format=torch.channels_last)
    down, mid = controlnet(noisy, t, encoder_hidden_states=hidden, controlnet_cond=cond, return_dict=False)
    pred = components.unet(noisy, t, encoder_hidden_states=hidden,
                           down_block_additional_residuals=[d.to(dtype) for d in down],
                           mid_block_additional_residual=mid.to(dtype), return_dict=False)[0]
    return F.mse_loss(pred.float(), target)


def noised_latents(scheduler, latents: torch.Tensor, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, timesteps, regression target) for one batch, in fp32 whatever the latents' dtype: in bf16
    the noise scale sqrt(1 - alphas_cumprod) of the first timesteps rounds to 0, and those steps would get no noise."""
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"scheduler prediction_type {kind!r}: mdland trains epsilon or v_prediction models")
    latents = latents.float()
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=torch.float32)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                      device=latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    return noisy, t, noise if kind == "epsilon" else scheduler.get_velocity(latents, noise, t)


def probe_batch(cfg: ControlNetTrainConfig, first: pa.Table) -> dict:
    """The first `batch_size` faces of the data in file order, prepared: the same batch on every rank and after
    every resume, whatever order the epochs draw. `first`: the data's first shard, already read."""
    tables = [first.select(COLUMNS).slice(0, cfg.batch_size)]
    rows = tables[0].num_rows
    if rows < cfg.batch_size:  # a short first shard: the next ones in file order, listed only as far as needed
        for uri in itertools.islice((u for d in cfg.data for u in shard_uris(d)), 1, None):
            tables.append(read_shard(uri).select(COLUMNS).slice(0, cfg.batch_size - rows))
            rows += tables[-1].num_rows
            if rows == cfg.batch_size:
                break
    table = pa.concat_tables(tables)
    return prepare_batch({c: table.column(c).to_pylist() for c in COLUMNS}, cfg.resolution)


def validation_conditions(cfg: ControlNetTrainConfig, first: pa.Table) -> tuple[np.ndarray, list[str]]:
    """Held-out conditions: landmark sets from the data's first shard `first`, each changed by two random edits, at
    `resolution`."""
    n = min(cfg.num_validation, first.num_rows)
    points = landmarks_array(first)[:n]
    size = decode_image(first.column("image")[0].as_py(), cfg.data[0]).shape[1]
    edited = []
    for i, p in enumerate(points):
        p = resize_points(p, (size, size), (cfg.resolution, cfg.resolution))
        e, _ = sample_edits(p, np.random.default_rng([cfg.seed, 1_000_003, i]), k=2)
        edited.append(fit_in_frame(e, cfg.resolution))
    prompts = [str(s) for s in first.column("prompt").to_pylist()[:n]] if cfg.stage == "stage2" else [""] * n
    return np.stack(edited), prompts


@torch.no_grad()
def validation_grid(components: SDComponents, controlnet: ControlNetModel, points: np.ndarray, prompts: list[str],
                    cfg: ControlNetTrainConfig, device: torch.device) -> np.ndarray:
    """Condition images over the faces the ControlNet draws for them, landmarks dotted on top."""
    from diffusers import StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, controlnet=controlnet, scheduler=ddim_scheduler(components), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    conditions = [render_landmarks(p, cfg.resolution) for p in points]
    images = pipe(prompts, image=[Image.fromarray(c) for c in conditions], height=cfg.resolution,
                  width=cfg.resolution, num_inference_steps=cfg.validation_steps, output_type="np",
                  generator=torch.Generator(device="cpu").manual_seed(cfg.seed)).images
    faces = [draw_landmarks((np.clip(im, 0, 1) * 255).astype(np.uint8), p) for im, p in zip(images, points)]
    return image_grid(conditions + faces, columns=len(points))


def train_func(config: dict) -> None:
    """The training loop of one worker. `config`: {"train": ControlNetTrainConfig fields, "local": bool}."""
    setup_logging()
    cfg = from_dict(ControlNetTrainConfig, config["train"])
    session = (LocalSession(cfg.storage_path, cfg.name, cfg.keep_checkpoints, lambda bs, seed: local_epoch(
        cfg.data, COLUMNS, partial(prepare_batch, resolution=cfg.resolution), bs, seed))
        if config.get("local") else RaySession())
    device = pick_device(cfg.use_gpu)
    on_gpu = device.type == "cuda"
    dtype = training_dtype(cfg.precision, on_gpu)
    components = load_components(cfg.model, seed=cfg.seed)
    torch.manual_seed(cfg.seed)  # the same new ControlNet weights on every rank
    controlnet = build_controlnet(components, cfg.controlnet)  # from the UNet's full-precision weights
    engine = controlnet_engine(components.frozen_to(device, dtype), controlnet, cfg, device, dtype)
    history: list[dict] = []
    with session.latest_checkpoint() as restored:
        if restored:
            _, client = engine.load_checkpoint(restored)
            history = client["history"] + [{"step": engine.global_steps, "resumed": True}]
            log.info("resumed from step %d", engine.global_steps)
    step = engine.global_steps
    reseed(cfg.seed, session.rank, step)
    text = PromptEmbeddings(components, device)

    def loss_of(batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        return diffusion_loss(components, engine, text, batch, dtype, generator)

    batches = endless(session, cfg.batch_size, cfg.seed + step)
    first = read_shard(shard_uris(cfg.data[0])[0])  # read once: the probe batch and the validation faces
    probe = _with_prompts(probe_batch(cfg, first), cfg, np.random.default_rng(cfg.seed))

    @torch.no_grad()
    def probe_loss() -> float:
        """Loss on one fixed batch with fixed noise: a steady measure of fitting, unlike the noisy training loss."""
        with torch.compiler.set_stance("force_eager"):  # with `compile`: no-grad would compile the networks again
            return float(loss_of(probe, torch.Generator(device=device).manual_seed(cfg.seed)))

    points, prompts = validation_conditions(cfg, first) if session.rank == 0 else (None, None)
    del first
    if not history:
        history.append({"step": step, "probe_loss": probe_loss()})
    log.info("stage %s from step %d to %d: %d worker(s) x batch %d x accumulation %d, lr %g", cfg.stage, step,
             cfg.max_steps, session.world, cfg.batch_size, cfg.gradient_accumulation, cfg.learning_rate)
    rng = np.random.default_rng([cfg.seed, session.rank, step])
    losses, seen, t0 = [], 0, time.time()
    while step < cfg.max_steps:
        batch = _with_prompts(next(batches), cfg, rng)
        loss = loss_of(batch)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())  # read back at log time: no device sync every step
        seen += len(batch["prompt"]) * session.world
        if engine.global_steps == step:
            continue  # inside a gradient-accumulation cycle
        step = engine.global_steps
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            # Waits for the device: time after it.
            mean_loss = float(mean_over_ranks(torch.stack(losses).float().mean(), session.world))
            rate = seen / (time.time() - t0)
            history.append({"step": step, "loss": mean_loss, "samples_per_s": rate})
            if session.rank == 0:
                log.info("step %d/%d loss %.4f %.1f samples/s", step, cfg.max_steps, mean_loss, rate)
            losses, seen, t0 = [], 0, time.time()
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            history.append({"step": step, "probe_loss": probe_loss()})
            _checkpoint(engine, session, components, cfg, history, points, prompts, device)
            seen, t0 = 0, time.time()  # keep checkpoint time out of the throughput figure
    # The checkpoint at max_steps published the export; a run restored past max_steps publishes what it restored.
    if step != cfg.max_steps:
        with tempfile.TemporaryDirectory() as d:
            export_controlnet(engine, d)
            if session.rank == 0:
                _publish_export(Path(d), cfg)


def _publish_export(local: Path, cfg: ControlNetTrainConfig) -> None:
    uri = storage.join(cfg.storage_path, cfg.name, "controlnet")
    storage.copy_from_local(str(local), uri)
    log.info("ControlNet exported to %s", uri)


def _with_prompts(batch: dict, cfg: ControlNetTrainConfig, rng: np.random.Generator) -> dict:
    """Stage 1 trains without prompts; stage 2 blanks a share of them for classifier-free guidance."""
    if cfg.stage == "stage1":
        prompts = [""] * len(batch["prompt"])
    else:
        prompts = ["" if rng.random() < cfg.empty_prompt_share else str(p) for p in batch["prompt"]]
    return {**batch, "prompt": prompts}


def _checkpoint(engine, session, components, cfg, history, points, prompts, device) -> None:
    step = engine.global_steps
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=f"step{step}", client_state={"history": history})
        metrics = {"step": step, **{k: v for r in history for k, v in r.items() if k != "resumed"}}
        export_controlnet(engine, Path(d) / "controlnet")
        if session.rank == 0 and step == cfg.max_steps:  # the last checkpoint's export is also the run's
            _publish_export(Path(d) / "controlnet", cfg)
        if session.rank == 0:
            (Path(d) / "history.json").write_text(json.dumps(history, indent=1))
            plot_curves(history, Path(d) / "loss.png", ("loss", "probe_loss"), f"ControlNet {cfg.stage}")
            engine.module.eval()
            with torch.compiler.set_stance("force_eager"):  # with `compile`: eval, no-grad, other shapes
                grid = validation_grid(components, engine.module, points, prompts, cfg, device)
            engine.module.train()
            Image.fromarray(grid).save(Path(d) / "validation.png")
            log.info("checkpoint at step %d (probe loss %.4f)", step, metrics["probe_loss"])
        session.report(metrics, d, step)


def run_training(cfg: ControlNetTrainConfig, local: bool = False) -> dict:
    """Train on Ray Train (or in this process with `local`); returns the last metrics and the export's URI."""
    local_model = cfg.model not in PRESETS
    cfg = replace(cfg, data=[storage.absolute(d) for d in cfg.data], storage_path=storage.absolute(cfg.storage_path),
                  controlnet=cfg.controlnet and storage.absolute(cfg.controlnet),
                  model=storage.absolute(cfg.model) if local_model else cfg.model)
    rows = check_config(cfg)
    check_resumable(storage.join(cfg.storage_path, cfg.name), local, 1 if local else cfg.num_workers,
                    "start a new run (another name) with `controlnet` set to this run's export, which keeps "
                    "the weights and resets the optimizer")
    export = storage.join(cfg.storage_path, cfg.name, "controlnet")
    log.info("training %s on %d faces from %s", cfg.stage, rows, ", ".join(cfg.data))
    encoder = None
    if cfg.cache_latents and not local:
        encoder = {"model": cfg.model, "seed": cfg.seed, "use_gpu": cfg.use_gpu, "precision": cfg.precision}
        log.info("encoding the %d faces' latents once for the run (cache_latents)", rows)
    return {**launch(train_func, cfg, lambda: ray_dataset(cfg.data, cfg.resolution, encoder, cfg.num_workers),
                     local), "export": export}

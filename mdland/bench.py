"""`mdland bench ...`: speed against a named baseline, measured in the same process on the same device.

- `train`: mdland's ControlNet training step (frozen parts in bf16, DeepSpeed ZeRO-2 bf16 ControlNet, cached prompt
  embeddings, channels-last, optionally torch.compile) against a plain PyTorch loop (fp32 weights, bf16 autocast,
  AdamW, prompt encoded every step), and against diffusers' example's setup (the same loop with the frozen parts
  in bf16), same batch; samples/s, ratios and peak memory.
- `generate`: mdland's sampler (half precision, batched guidance; on a GPU fused q/k/v and optional channels-last;
  optional torch.compile) against diffusers' `StableDiffusionControlNetPipeline` on the same modules, seeds and
  settings; images/s and ratio. With `--pipeline`, also the Ray Data pipeline's steady images/s against the bare
  sampler, and the time for 10k images.
- `write`: how many generated images/s the generation pipeline's shard assembler writes (and PNG encoding runs
  per core), on this machine's CPU: the ceiling of one `mdland generate` job, in GPUs' worth.
- `detector`: batched images/s and single-image latency of the STAR network (fp16 on GPU, fp32 on CPU); on a GPU
  also replayed from CUDA graphs, against the eager network.
- `serve`: end-to-end requests/s and p50/p95 latency over HTTP (Ray Serve behind HAProxy, concurrent loopback
  clients, `--replicas` sharing the device) against in-process batched inference of the same checkpoint; also
  single-request p50 latency.

`--profile PATH` (`train`, `generate`) also writes torch.profiler's operator table and a trace of a few steps.
"""

import gc
import json
import os
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from mdland.cluster import init_ray
from mdland.config import check_count
from mdland.log import get_logger
from mdland.session import check_precision, pick_device, set_single_process_env, training_dtype

log = get_logger(__name__)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def _timed(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of `step` after `warmup` calls."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps


def _warmed(name: str, make, warmup: int, device: torch.device, result: dict):
    """`make()`'s step after `warmup` calls, at least one: optimizers make their state, cuDNN picks its kernels and
    torch.compile compiles in the first. Records in `result` the peak GiB the contender allocated on the GPU above
    what was there before, and the seconds building and warming it up took (compiling, with torch.compile)."""
    log.info("%s: building and warming up (%d call(s))", name, max(warmup, 1))
    on_gpu = device.type == "cuda"
    if on_gpu:
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    step = make()
    for _ in range(max(warmup, 1)):
        step()
    if on_gpu:
        torch.cuda.synchronize(device)
        result[f"{name}_peak_gib"] = round((torch.cuda.max_memory_allocated(device) - before) / 2**30, 2)
    result[f"{name}_warmup_s"] = round(time.perf_counter() - t0, 2)
    return step


def _interleaved(steps: dict, calls: int, rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each of `steps` ({name: step}), timed in turns: `rounds` rounds of `calls` calls
    each, each round starting one contender later, so drift in clocks, heat or memory state falls on every
    contender alike."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(_timed(steps[name], calls, 0, device))
    return {name: statistics.median(t) for name, t in times.items()}


def _profile(step, steps: int, path: str, device: torch.device) -> None:
    """`steps` calls of `step` under torch.profiler: a Chrome / Perfetto trace (`path`.json.gz) and the operators by
    their own time on the device (the CPU without a GPU) as a table (`path`.txt)."""
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        for _ in range(steps):
            step()
        if on_gpu:
            torch.cuda.synchronize(device)
    prof.export_chrome_trace(f"{path}.json.gz")
    table = prof.key_averages().table(sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total",
                                      row_limit=40, max_name_column_width=70)
    Path(f"{path}.txt").write_text(f"{steps} calls\n{table}")
    log.info("profile of %d calls: %s.txt, %s.json.gz", steps, path, path)


def _plain_loop(preset: str, batch: dict, device: torch.device, frozen_dtype: torch.dtype = torch.float32):
    """One step of the textbook loop, as a function: fp32 ControlNet, bf16 autocast, AdamW, prompt encoded every
    step; the frozen VAE, UNet and text encoder in `frozen_dtype` (fp32 in the plain loop, bf16 as diffusers' example
    has them)."""
    from mdland.diffusion.models import build_controlnet, build_preset

    c = build_preset(preset)
    controlnet = build_controlnet(c).to(device).train()  # copied from the UNet before the UNet's cast
    for m in (c.vae, c.unet, c.text_encoder):
        m.requires_grad_(False).to(device, frozen_dtype)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-5)
    images, conditions = batch["image"].to(device), batch["condition"].to(device)
    ids = c.tokenizer(batch["prompt"], padding="max_length", max_length=c.tokenizer.model_max_length,
                      return_tensors="pt").input_ids.to(device)
    n = len(batch["prompt"])

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pixels, cond = images.float() / 127.5 - 1.0, conditions.float() / 255.0
            with torch.no_grad():
                latents = c.vae.encode(pixels).latent_dist.sample() * c.vae.config.scaling_factor
                hidden = c.text_encoder(ids)[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (n,), device=device)
            noisy = c.noise_scheduler.add_noise(latents, noise, t)
            down, mid = controlnet(noisy, t, encoder_hidden_states=hidden, controlnet_cond=cond, return_dict=False)
            pred = c.unet(noisy, t, encoder_hidden_states=hidden, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
            loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_train(preset: str = "sd15", batch_size: int = 32, resolution: int = 256, steps: int = 10,
                warmup: int = 3, compile: bool = False, zero_stage: int = 2, cache_latents: bool = True,
                profile: str | None = None, rounds: int = 3) -> dict:
    """The plain loop, diffusers' example's setup and mdland's step, all built at once (about 36 GiB estimated at
    sd15, batch 32), each warmed up with `warmup` steps (one at least), then timed in turns: `rounds` rounds of
    `steps` steps, the median round reported. With `profile`, three more mdland steps run under torch.profiler."""
    from mdland.diffusion.models import PromptEmbeddings, build_controlnet, build_preset, latent_distribution
    from mdland.diffusion.train import ControlNetTrainConfig, controlnet_engine, diffusion_loss

    check_count("steps", steps)
    check_count("rounds", rounds)
    device = pick_device(use_gpu=True)  # cuDNN autotuning on for the baseline and mdland alike
    check_precision("auto", zero_stage, device.type == "cuda")  # bf16 needs ZeRO's fp32 master weights
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (batch_size, 3, resolution, resolution), generator=gen, dtype=torch.uint8),
             "condition": torch.randint(0, 256, (batch_size, 3, resolution, resolution), generator=gen,
                                        dtype=torch.uint8),
             "prompt": [""] * batch_size}
    result = {"benchmark": "train", "preset": preset, "device": _device_name(device), "batch_size": batch_size,
              "resolution": resolution, "baseline": "plain PyTorch loop: fp32 weights, bf16 autocast, AdamW"}

    plain_step = _warmed("plain", lambda: _plain_loop(preset, batch, device), warmup, device, result)
    # A second, stronger baseline: diffusers' train_controlnet.py keeps the frozen parts in the training precision.
    example_step = _warmed("diffusers_example", lambda: _plain_loop(preset, batch, device, torch.bfloat16), warmup,
                           device, result)

    encode = None

    def build_mdland():
        """The step train_func runs, on the batch as the run's data hands it over."""
        nonlocal encode
        set_single_process_env()
        dtype = training_dtype("auto", device.type == "cuda")
        c = build_preset(preset)
        controlnet = build_controlnet(c)
        cfg = replace(ControlNetTrainConfig(), batch_size=batch_size, learning_rate=1e-5, compile=compile,
                      zero_stage=zero_stage, cache_latents=cache_latents)
        engine = controlnet_engine(c.frozen_to(device, dtype), controlnet, cfg, device, dtype)
        text = PromptEmbeddings(c, device)
        # On the device already, as the plain loop's copy is: only the step itself is timed.
        data = {**batch, "image": batch["image"].to(device), "condition": batch["condition"].to(device)}
        result.update(compile=compile, zero_stage=zero_stage, zero_stage_run=engine.zero_optimization_stage(),
                      cache_latents=cache_latents)
        if cache_latents:
            # What the run's one encoding pass (LatentEncoder) does per batch, timed on its own.
            with torch.no_grad():
                encode = _timed(lambda: latent_distribution(c.vae, data["image"], dtype), steps, warmup, device)
                data = {"latents": latent_distribution(c.vae, data["image"], dtype).parameters,
                        "condition": data["condition"], "prompt": data["prompt"]}
            result["latent_encode_images_per_s"] = round(batch_size / encode, 2)

        def mdland_step():
            loss = diffusion_loss(c, engine, text, data, dtype)
            engine.backward(loss)
            engine.step()

        return mdland_step

    mdland_step = _warmed("mdland", build_mdland, warmup, device, result)
    seconds = _interleaved({"plain": plain_step, "example": example_step, "mdland": mdland_step}, steps, rounds,
                           device)
    plain, example, ours = seconds["plain"], seconds["example"], seconds["mdland"]
    result["rounds"] = rounds
    result["plain_samples_per_s"] = round(batch_size / plain, 2)
    result["diffusers_example_samples_per_s"] = round(batch_size / example, 2)
    result["mdland_samples_per_s"] = round(batch_size / ours, 2)
    result["speedup"] = round(plain / ours, 3)
    result["speedup_vs_diffusers_example"] = round(example / ours, 3)
    if encode is not None:
        # A run encodes each face once: a one-epoch run pays the whole pass, a longer one less per epoch.
        result["speedup_one_epoch_run"] = round(plain / (ours + encode), 3)
    log.info("plain loop %.2f, diffusers-example loop (frozen parts bf16) %.2f, mdland step %.2f samples/s (%.2fx the "
             "plain loop)", batch_size / plain, batch_size / example, batch_size / ours, plain / ours)
    if profile:
        _profile(mdland_step, 3, profile, device)
    return result


def bench_generate(preset: str = "sd15", batch_size: int = 64, resolution: int = 256, steps: int = 50,
                   guidance: float = 7.5, repeats: int = 1, compile: bool = False, pipeline: bool = False,
                   pipeline_images: int = 512, profile: str | None = None, channels_last: bool = False,
                   rounds: int = 3, compile_mode: str | None = None) -> dict:
    """The stock pipeline and mdland's sampler (on its own copy of the modules: it changes their layout), each warmed
    up with one batch, then timed in turns: `rounds` rounds of `repeats` batches, the median round reported. With
    `profile`, one more batch of mdland's sampler runs under torch.profiler (`_profile`), at 3 steps. A
    `compile_mode` compiles."""
    import copy
    from functools import partial

    import numpy as np
    from diffusers import StableDiffusionControlNetPipeline
    from PIL import Image

    from mdland.data.procedural import random_landmarks
    from mdland.diffusion.models import build_controlnet, build_preset, ddim_scheduler
    from mdland.generation.plan import DEFAULT_STYLES, load_styles
    from mdland.generation.sampler import LandmarkSampler
    from mdland.landmarks.render import render_landmarks

    check_count("repeats", repeats)
    check_count("rounds", rounds)
    compile = compile or compile_mode is not None
    device = pick_device(use_gpu=True)  # cuDNN autotuning on for the baseline and mdland alike
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    c = build_preset(preset)  # on the CPU: each contender's peak memory counts the weights it puts on the device
    controlnet = build_controlnet(c).requires_grad_(False)
    styles = load_styles(DEFAULT_STYLES)
    conditions = np.stack([render_landmarks(random_landmarks(np.random.default_rng(i), resolution), resolution)
                           for i in range(batch_size)])
    prompts = [styles[i % len(styles)]["prompt"] for i in range(batch_size)]
    seeds = list(range(batch_size))
    result = {"benchmark": "generate", "preset": preset, "device": _device_name(device), "batch_size": batch_size,
              "resolution": resolution, "steps": steps, "guidance": guidance, "dtype": str(dtype).split(".")[-1],
              "baseline": "diffusers StableDiffusionControlNetPipeline, same modules, seeds and settings",
              "compile": compile, "compile_mode": compile_mode}

    def build_stock():
        c.frozen_to(device, dtype)
        pipe = StableDiffusionControlNetPipeline(
            vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
            controlnet=controlnet.eval().to(device, dtype), scheduler=ddim_scheduler(c), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        images = [Image.fromarray(x) for x in conditions]
        return lambda: pipe(prompts, image=images, height=resolution, width=resolution, num_inference_steps=steps,
                            guidance_scale=guidance, output_type="np",
                            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds])

    on_gpu = device.type == "cuda"
    channels_last = channels_last and on_gpu  # as the pipeline's actors apply it (build_sampler)

    def build_ours():
        # Its own copy of the modules: it changes their layout and fuses the UNet's projections.
        own = replace(c, vae=copy.deepcopy(c.vae), unet=copy.deepcopy(c.unet),
                      text_encoder=copy.deepcopy(c.text_encoder))
        sampler = LandmarkSampler(own, copy.deepcopy(controlnet), device, dtype, steps, guidance, compile=compile,
                                  channels_last=channels_last, vae_batch_size=16, fuse_qkv=on_gpu,
                                  compile_mode=compile_mode)
        return partial(sampler, conditions, prompts, seeds)

    stock = _warmed("stock", build_stock, 1, device, result)
    ours = _warmed("mdland", build_ours, 1, device, result)
    sampler = ours.func
    result["channels_last"] = sampler.components.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    seconds = _interleaved({"stock": stock, "mdland": ours}, repeats, rounds, device)
    t_stock, t_ours = seconds["stock"], seconds["mdland"]
    result.update(rounds=rounds, stock_images_per_s=round(batch_size / t_stock, 3),
                  mdland_images_per_s=round(batch_size / t_ours, 3), speedup=round(t_stock / t_ours, 3))
    log.info("stock pipeline %.3f, mdland sampler %.3f images/s (%.2fx the stock pipeline)", batch_size / t_stock,
             batch_size / t_ours, t_stock / t_ours)
    if profile:
        sampler.steps = min(3, steps)  # a step repeats itself: three show it and the decode, in a trace 1/16 the size
        _profile(ours, 1, profile, device)
        sampler.steps = steps
    if pipeline:
        # The pipeline's actor loads its own copy onto the device: free this process's share of it.
        del stock, ours, sampler
        c.frozen_to("cpu", torch.float32)
        controlnet.to("cpu", torch.float32)
        torch._dynamo.reset()  # compiled graphs and their CUDA-graph memory
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
        result.update(_bench_pipeline(preset, controlnet, batch_size, resolution, steps, guidance, compile,
                                      compile_mode, channels_last, pipeline_images, batch_size / t_ours))
    return result


def _bench_pipeline(preset, controlnet, batch_size, resolution, steps, guidance, compile, compile_mode,
                    channels_last, images, bare) -> dict:
    """The Ray Data pipeline on this machine's devices (one actor per GPU), against the bare sampler's rate on as
    many devices."""
    import tempfile

    from mdland.data.procedural import write_faces
    from mdland.generation.pipeline import run_generation
    from mdland.generation.plan import DEFAULT_STYLES, GenerateConfig, load_styles

    actors = max(1, torch.cuda.device_count())
    with tempfile.TemporaryDirectory() as d:
        write_faces(f"{d}/src", 32, seed=0, size=resolution)
        controlnet.save_pretrained(f"{d}/controlnet")
        # Whole batches only, as the bare sampler ran: one style, a multiple of the batch size.
        cfg = GenerateConfig(source=[f"{d}/src"], output=f"{d}/out", model=preset, controlnet=f"{d}/controlnet",
                             styles=[load_styles(DEFAULT_STYLES)[0]["name"]],
                             images_per_style=-(-images // batch_size) * batch_size, resolution=resolution,
                             num_inference_steps=steps, guidance_scale=guidance, rows_per_shard=batch_size,
                             batch_size=batch_size, use_gpu=torch.cuda.is_available(), num_actors=actors,
                             compile=compile, compile_mode=compile_mode, channels_last=channels_last)
        init_ray(include_dashboard=False)
        out = run_generation(cfg)
    rate = out["steady_images_per_s"]
    return {"pipeline_images_per_s": round(rate, 3) if rate else None, "pipeline_actors": actors,
            "pipeline_vs_bare_sampler": round(rate / (bare * actors), 3) if rate else None,
            "projected_10k_images_min": round(10_000 / rate / 60, 1) if rate else None}


def bench_write(images: str = "faces", count: int = 4000, rows_per_shard: int = 1000, batch_size: int = 64,
                output: str | None = None) -> dict:
    """The shard assembler's and PNG encoding's images/s on generated-size images: procedural `faces` (compress like
    drawings) or `noise` (incompressible, the heaviest PNGs). Shards go to `output` (local or s3://; a temporary
    folder by default)."""
    import tempfile
    from dataclasses import asdict

    import numpy as np

    from mdland.data import storage
    from mdland.data.procedural import procedural_faces
    from mdland.data.shards import decode_image
    from mdland.diffusion.models import build_controlnet, build_preset
    from mdland.generation.pipeline import ShardAssembler, encode_images
    from mdland.generation.plan import GenerateConfig

    if images not in ("faces", "noise"):
        raise ValueError(f"images: expected faces or noise, got {images!r}")
    if output and (storage.list_files(output) or storage.list_folders(output)):
        raise ValueError(f"--output {output}: holds files; the benchmark writes shards of made-up rows there, so it "
                         "takes an empty folder")
    size = 256
    if images == "noise":
        pool = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    else:
        pool = np.stack([decode_image(f.image) for f in procedural_faces(batch_size, seed=0, size=size)])
    with tempfile.TemporaryDirectory() as d:
        build_controlnet(build_preset("tiny")).save_pretrained(f"{d}/controlnet")  # the id the rows carry
        cfg = GenerateConfig(output=output or f"{d}/out", controlnet=f"{d}/controlnet", styles=["cartoon"],
                             images_per_style=count, rows_per_shard=rows_per_shard, batch_size=batch_size)
        assembler = ShardAssembler(asdict(cfg), total=count, weights=cfg.plan_identity()["weights"])
        batches = []
        for start in range(0, count, batch_size):
            index = np.arange(start, min(start + batch_size, count))
            n = len(index)
            batches.append({
                "index": index, "shard": index // rows_per_shard, "seed": index,
                "key": np.array([f"synthetic-0-{i:09d}" for i in index], dtype=object),
                "prompt": np.array(["a portrait of cartoon style"] * n, dtype=object),
                "style": np.array(["cartoon"] * n, dtype=object),
                "edits": np.array(["chubby,open_eyes"] * n, dtype=object),
                "edit_params": np.array(["[]"] * n, dtype=object),
                "landmarks": np.zeros((n, 68, 2), np.float32), "alignment": np.full(n, np.nan, np.float32),
                "image": pool[:n]})
        t0 = time.perf_counter()
        encoded = [encode_images(b) for b in batches]
        t1 = time.perf_counter()
        written = [int(s) for b in encoded for s in assembler.add(b)["shard"]]
        t2 = time.perf_counter()
    png_bytes = float(np.mean([len(x) for b in encoded for x in b["image"]]))
    rate = count / (t2 - t1)
    return {"benchmark": "write", "device": _device_name(torch.device("cpu")), "images": images, "count": count,
            "shards_written": len(written), "png_kib": round(png_bytes / 1024, 1),
            "encode_images_per_s_per_core": round(count / (t1 - t0), 1), "assembler_images_per_s": round(rate, 1),
            "assembler_mib_per_s": round(rate * png_bytes / 2**20, 1),
            "h100s_at_32_images_per_s": round(rate / 32, 1)}


def bench_detector(arch: str = "star-300w", batch_size: int = 32, repeats: int = 5, warmup: int = 2) -> dict:
    """Batched images/s and single-image latency of the STAR network (fp16 on GPU, fp32 on CPU), from uint8 crops in
    host memory to points back in it; on a GPU also replayed from CUDA graphs (`CudaGraphDetector`, as serving runs
    it) against the eager network."""
    import numpy as np

    from mdland.detector.checkpoint import load_detector
    from mdland.detector.inference import CudaGraphDetector, crop_landmarks

    device = pick_device(use_gpu=True)  # cuDNN autotuning on for the baseline and mdland alike
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    net = load_detector(None, arch).eval().to(device, dtype)  # random weights: the same work
    size = net.arch.input_size
    crops = torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8)

    def measure(run) -> tuple[float, list[float]]:
        per_batch = _timed(lambda: run(crops), repeats, warmup, device)
        latencies = [_timed(lambda: run(crops[:1]), 1, 0, device) * 1000 for _ in range(warmup + 4 * repeats)]
        return batch_size / per_batch, latencies[warmup:]

    def numbers(prefix: str, rate: float, latencies: list[float]) -> dict:
        return {f"{prefix}batched_images_per_s": round(rate, 2),
                f"{prefix}single_image_p50_ms": round(float(np.percentile(latencies, 50)), 2),
                f"{prefix}single_image_p95_ms": round(float(np.percentile(latencies, 95)), 2)}

    with torch.no_grad():
        result = {"benchmark": "detector", "arch": arch, "device": _device_name(device),
                  "dtype": str(dtype).split(".")[-1], "batch_size": batch_size,
                  **numbers("", *measure(lambda x: crop_landmarks(net, x.to(device), dtype).cpu()))}
        if device.type == "cuda":
            t0 = time.perf_counter()
            graphed = CudaGraphDetector(net, dtype, batch_size)
            result["cuda_graphs_capture_s"] = round(time.perf_counter() - t0, 2)
            rate, latencies = measure(graphed)
            result.update(numbers("cuda_graphs_", rate, latencies))
            result["cuda_graphs_single_image_speedup"] = round(
                result["single_image_p50_ms"] / result["cuda_graphs_single_image_p50_ms"], 2)
            result["cuda_graphs_batched_speedup"] = round(rate / result["batched_images_per_s"], 2)
    return result


def _in_process_images_per_s(detector: str, images: list, batch_size: int, device: torch.device) -> float:
    """The replica's own inference (`serving_detector`), warping and all, in this process."""
    from mdland.detector.inference import predict, serving_detector
    from mdland.landmarks.align import crop_from_box

    net, dtype = serving_detector(detector, device, batch_size)
    size = net.arch.input_size
    crops = [crop_from_box((0, 0, size, size))] * batch_size
    return batch_size / _timed(lambda: predict(net, images[:batch_size], crops, dtype), 5, 2, device)


def bench_serve(arch: str = "star-300w", requests_total: int = 200, clients: int | None = None,
                max_batch_size: int = 16, replicas: int = 1, port: int | None = None) -> dict:
    """`clients` defaults to twice `max_batch_size` per replica: a batch can only fill while the batch before it
    runs if that many requests are in flight. `replicas` share the device and the CPUs (each a fraction of the GPU and
    of Ray's CPUs, whose whole part sets its torch threads, so together they have the baseline's): a replica is one
    Python process, whose decoding and request handling a single baseline process does not have to do."""
    import tempfile
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import ray
    import requests
    from ray import serve

    from mdland.data.procedural import procedural_faces
    from mdland.data.shards import decode_image
    from mdland.detector.checkpoint import load_detector, save_checkpoint
    from mdland.serve.app import APP_NAME, start_server, stop_server

    if replicas < 1:
        raise ValueError(f"replicas: {replicas} is not a positive count")
    clients = clients or 2 * max_batch_size * replicas
    device = pick_device(use_gpu=True)  # cuDNN autotuning on for the baseline and mdland alike
    net = load_detector(None, arch)
    size = net.arch.input_size
    faces = [f.image for f in procedural_faces(max(32, max_batch_size), seed=0, size=size)]
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(net, f"{d}/det.pkl")
        in_process = _in_process_images_per_s(f"{d}/det.pkl", [decode_image(f) for f in faces], max_batch_size,
                                              device)
        init_ray()
        share = {"num_cpus": ray.available_resources().get("CPU", 1.0) / replicas}
        if device.type == "cuda":
            share["num_gpus"] = 1 / replicas
        url = start_server({"detector": f"{d}/det.pkl", "max_batch_size": max_batch_size,
                            "use_gpu": device.type == "cuda", "num_replicas": replicas,
                            "ray_actor_options": share}, port=port)
        local = threading.local()  # a kept-alive connection per client thread, as a real client would hold

        try:
            def post(i):
                if not hasattr(local, "session"):
                    local.session = requests.Session()
                t0 = time.perf_counter()
                r = local.session.post(f"{url}/v1/landmarks", data=faces[i % len(faces)],
                                       headers={"content-type": "image/png"}, timeout=120)
                ms = (time.perf_counter() - t0) * 1000
                return r.status_code, ms, r.json().get("batch_size", 0) if r.status_code == 200 else 0

            for i in range(clients):  # warm the replica
                post(i)
            states = serve.status().applications[APP_NAME].deployments["LandmarkDetector"].replica_states
            running = int(states.get("RUNNING", 0))
            replica_threads = requests.get(f"{url}/v1/model", timeout=60).json()["torch_threads"]
            single = [post(i)[1] for i in range(20)]
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(post, range(requests_total)))
            elapsed = time.perf_counter() - t0
        finally:
            stop_server()
    # Only answered requests count: a fast error would otherwise raise the rate and lower the latencies.
    ok = [(ms, batch) for status, ms, batch in results if status == 200]
    errors = requests_total - len(ok)
    if errors:
        log.warning("%d of %d requests failed; the rate and latencies are of the %d answered", errors,
                    requests_total, len(ok))
    if not ok:
        raise RuntimeError(f"bench serve: all {requests_total} requests failed")
    latencies = [ms for ms, _ in ok]
    rps = len(ok) / elapsed
    # As init_ray set it for a Ray this process started (a cluster's nodes set their own).
    ingress = "haproxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "proxy actors"
    return {"benchmark": "serve", "arch": arch, "device": _device_name(device), "ingress": ingress,
            "replicas_running": running,
            "torch_threads": {"replica": replica_threads, "in_process": torch.get_num_threads()}, "clients": clients,
            "max_batch_size": max_batch_size, "requests": requests_total, "errors": errors,
            "baseline": f"in-process batched inference, batch {max_batch_size}, the replica's detector",
            "in_process_images_per_s": round(in_process, 2), "http_requests_per_s": round(rps, 2),
            "ratio": round(rps / in_process, 3), "mean_batch_size": round(float(np.mean([b for _, b in ok])), 2),
            "p50_ms": round(float(np.percentile(latencies, 50)), 1),
            "p95_ms": round(float(np.percentile(latencies, 95)), 1),
            "single_request_p50_ms": round(float(np.percentile(single, 50)), 1)}


def write_result(result: dict, path: str | None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")

"""`mdland bench ...`: speed against a named baseline, measured in the same process on the same device.

- `train`: mdland's ControlNet training step (frozen parts in bf16, DeepSpeed ZeRO-2 bf16 ControlNet, cached prompt
  embeddings, channels-last) against a plain PyTorch loop (fp32 weights, bf16 autocast, AdamW, prompt encoded every
  step), same batch; samples/s, ratio and peak memory.
"""

import json
import os
import socket
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from mdland.log import get_logger

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


def _peak_and_reset(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return round(peak, 2)


def bench_train(preset: str = "sd15", batch_size: int = 32, resolution: int = 256, steps: int = 10,
                warmup: int = 3) -> dict:
    from mdland.diffusion.models import build_controlnet, build_preset
    from mdland.diffusion.train import ControlNetTrainConfig, PromptEmbeddings, controlnet_engine, diffusion_loss

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.rand(batch_size, 3, resolution, resolution, generator=gen) * 2 - 1,
             "conditioning": torch.rand(batch_size, 3, resolution, resolution, generator=gen),
             "prompt": [""] * batch_size}
    result = {"benchmark": "train", "preset": preset, "device": _device_name(device), "batch_size": batch_size,
              "resolution": resolution, "baseline": "plain PyTorch loop: fp32 weights, bf16 autocast, AdamW"}

    # Baseline: the textbook loop.
    c = build_preset(preset)
    for m in (c.vae, c.unet, c.text_encoder):
        m.requires_grad_(False).to(device)
    controlnet = build_controlnet(c).to(device).train()
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-5)
    pixels, cond = batch["pixel_values"].to(device), batch["conditioning"].to(device)
    ids = c.tokenizer(batch["prompt"], padding="max_length", max_length=c.tokenizer.model_max_length,
                      return_tensors="pt").input_ids.to(device)

    def plain_step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            with torch.no_grad():
                latents = c.vae.encode(pixels).latent_dist.sample() * c.vae.config.scaling_factor
                hidden = c.text_encoder(ids)[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (batch_size,), device=device)
            noisy = c.noise_scheduler.add_noise(latents, noise, t)
            down, mid = controlnet(noisy, t, encoder_hidden_states=hidden, controlnet_cond=cond, return_dict=False)
            pred = c.unet(noisy, t, encoder_hidden_states=hidden, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
            loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    plain = _timed(plain_step, steps, warmup, device)
    result["plain_samples_per_s"] = round(batch_size / plain, 2)
    result["plain_peak_gib"] = _peak_and_reset(device)
    del c, controlnet, opt
    log.info("plain loop: %.2f samples/s", batch_size / plain)

    # mdland: the step train_func runs.
    for var, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(var, value)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    c = build_preset(preset).frozen_to(device, dtype)
    cfg = replace(ControlNetTrainConfig(), batch_size=batch_size, learning_rate=1e-5)
    engine = controlnet_engine(c, build_controlnet(c), cfg, device)
    text = PromptEmbeddings(c, device)

    def mdland_step():
        loss = diffusion_loss(c, engine, text, batch, dtype)
        engine.backward(loss)
        engine.step()

    ours = _timed(mdland_step, steps, warmup, device)
    result["mdland_samples_per_s"] = round(batch_size / ours, 2)
    result["mdland_peak_gib"] = _peak_and_reset(device)
    result["speedup"] = round(plain / ours, 3)
    log.info("mdland step: %.2f samples/s (%.2fx the plain loop)", batch_size / ours, plain / ours)
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_result(result: dict, path: str | None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")

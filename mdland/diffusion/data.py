"""Training batches for the ControlNet: target image and condition image as uint8 (B, 3, H, W), and the prompt.

`prepare_batch` is the one preprocessing function (`prepare_targets` then `conditions_from_points`); Ray Data maps it
over shards for Ray Train workers, and the plain-process mode applies it to shards read directly. Images stay uint8
until they are on the device (a quarter of the bytes of float32 through the object store and the host-device link);
`diffusion_loss` scales them there.

With `cache_latents`, Ray Data encodes each target once per run (`LatentEncoder` actors, one per training worker,
before the workers start) and keeps the VAE's latent distributions instead of the images; each step then samples from
them, as encoding every step would. On an H100 the VAE encoder is ~35% of an SD 1.5 ControlNet step at 256x256.
"""

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from mdland.data.datasets import read_shards
from mdland.data.shards import decode_image, landmarks_from_rows
from mdland.landmarks.align import resize_points
from mdland.landmarks.render import render_landmarks
from mdland.log import get_logger, setup_logging

if TYPE_CHECKING:
    import ray.data

COLUMNS = ["key", "image", "landmarks", "prompt"]
log = get_logger(__name__)


def prepare_targets(batch: dict, resolution: int) -> dict:
    """Decode and resize to `resolution`; the landmarks follow as `points` (B, 68, 2)."""
    images, all_points = [], []
    for key, data, points in zip(batch["key"], batch["image"], landmarks_from_rows(batch["landmarks"])):
        image = decode_image(data, str(key))
        h, w = image.shape[:2]
        if (h, w) != (resolution, resolution):
            image = np.asarray(Image.fromarray(image).resize((resolution, resolution), Image.Resampling.BICUBIC))
            points = resize_points(points, (w, h), (resolution, resolution))
        images.append(image.transpose(2, 0, 1))
        all_points.append(points)
    return {"image": np.stack(images), "points": np.stack(all_points).astype(np.float32),
            "prompt": np.asarray([str(p) for p in batch["prompt"]], dtype=object)}


def conditions_from_points(batch: dict, resolution: int) -> dict:
    """Replace `points` with each face's condition image."""
    out = {k: v for k, v in batch.items() if k != "points"}
    out["condition"] = np.stack([render_landmarks(p, resolution).transpose(2, 0, 1) for p in batch["points"]])
    return out


def prepare_batch(batch: dict, resolution: int) -> dict:
    """Decode, resize to `resolution`, render each face's condition from its (rescaled) landmarks."""
    return conditions_from_points(prepare_targets(batch, resolution), resolution)


class LatentEncoder:
    """Ray Data actor: replaces `image` with `latents`, the VAE's latent distribution of each target (its mean and
    log-variance, (B, 8, H/8, W/8)), computed in the training precision."""

    def __init__(self, model: str, seed: int, use_gpu: bool, precision: str):
        import torch

        from mdland.diffusion.models import load_vae
        from mdland.session import pick_device, training_dtype

        setup_logging()
        self.device = pick_device(use_gpu)
        self.dtype = training_dtype(precision, self.device.type == "cuda")
        self.vae = load_vae(model, seed).requires_grad_(False).eval().to(self.device, self.dtype)
        # numpy has no bf16: keep bf16 results as fp16 (moments are small numbers, well inside fp16's range).
        self.out_dtype = np.float32 if self.dtype == torch.float32 else np.float16

    def __call__(self, batch: dict) -> dict:
        import torch

        from mdland.diffusion.models import latent_distribution

        with torch.no_grad():
            images = torch.as_tensor(batch["image"]).to(self.device)
            moments = latent_distribution(self.vae, images, self.dtype).parameters
        out = {k: v for k, v in batch.items() if k != "image"}
        out["latents"] = moments.float().cpu().numpy().astype(self.out_dtype)
        return out


def ray_dataset(datasets: list[str], resolution: int, encoder: dict | None = None,
                workers: int = 1) -> "ray.data.Dataset":
    """A Ray Dataset of prepared ControlNet training batches over the shards of `datasets`. With `encoder`
    (`LatentEncoder`'s arguments), the targets are encoded now, once, by `workers` actors, and the dataset holds
    their latents."""
    if encoder is None:
        return read_shards(datasets, COLUMNS).map_batches(prepare_batch, fn_kwargs={"resolution": resolution},
                                                        batch_format="numpy", batch_size=32)
    use_gpu = encoder["use_gpu"]
    encoded = (read_shards(datasets, COLUMNS, shuffle=False)
               .map_batches(prepare_targets, fn_kwargs={"resolution": resolution}, batch_format="numpy",
                            batch_size=32)
               .map_batches(LatentEncoder, fn_constructor_kwargs=encoder, batch_format="numpy", batch_size=64,
                            concurrency=workers, num_gpus=1 if use_gpu else 0,
                            # on CPU a fraction, so reading and decoding tasks still get a core on a small machine
                            num_cpus=1 if use_gpu else 0.5)
               .materialize())
    # Held in the object store for the whole run (~16 KiB a face at 256 px). Its blocks cannot be rebuilt once the
    # encoding actors are gone, so a node lost on a multi-node cluster fails the run's restarts: there, or for sets
    # too large for the object store, set cache_latents: false.
    log.info("latent cache: %d faces, %.1f MiB", encoded.count(), encoded.size_bytes() / 2**20)
    # Shuffled in full each epoch, cheap at this size: the encoded blocks hold faces in file (domain) order.
    return encoded.random_shuffle().map_batches(conditions_from_points, fn_kwargs={"resolution": resolution},
                                                batch_format="numpy", batch_size=32)

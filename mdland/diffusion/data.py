"""Training batches for the ControlNet: target image and condition image as uint8 (B, 3, H, W), and the prompt.

`prepare_batch` is the one preprocessing function; Ray Data maps it over shards for Ray Train workers, and the
plain-process mode applies it to shards read directly. Images stay uint8 until they are on the device (a quarter of
the bytes of float32 through the object store and the host-device link); `diffusion_loss` scales them there.
"""

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from mdland.data.datasets import read_shards
from mdland.data.shards import decode_image, landmarks_from_rows
from mdland.landmarks.align import resize_points
from mdland.landmarks.render import render_landmarks

if TYPE_CHECKING:
    import ray.data

COLUMNS = ["key", "image", "landmarks", "prompt"]


def prepare_batch(batch: dict, resolution: int) -> dict:
    """Decode, resize to `resolution`, render each face's condition from its (rescaled) landmarks."""
    images, conditions = [], []
    for key, data, points in zip(batch["key"], batch["image"], landmarks_from_rows(batch["landmarks"])):
        image = decode_image(data, str(key))
        h, w = image.shape[:2]
        if (h, w) != (resolution, resolution):
            image = np.asarray(Image.fromarray(image).resize((resolution, resolution), Image.Resampling.BICUBIC))
            points = resize_points(points, (w, h), (resolution, resolution))
        images.append(image.transpose(2, 0, 1))
        conditions.append(render_landmarks(points, resolution).transpose(2, 0, 1))
    return {"image": np.stack(images), "condition": np.stack(conditions),
            "prompt": np.asarray([str(p) for p in batch["prompt"]], dtype=object)}


def ray_dataset(datasets: list[str], resolution: int) -> "ray.data.Dataset":
    """A Ray Dataset of prepared ControlNet training batches over the shards of `datasets`."""
    return read_shards(datasets, COLUMNS).map_batches(prepare_batch, fn_kwargs={"resolution": resolution},
                                                    batch_format="numpy", batch_size=32)

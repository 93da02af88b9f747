"""The GPU paths, run on purpose on a CUDA machine (`pytest -m gpu`); skipped without one."""

import numpy as np
import pytest
import torch

from mdland.data.procedural import write_faces
from mdland.diffusion.models import build_controlnet, build_preset

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    write_faces(str(root / "faces"), 16, seed=0, size=64)
    return root / "faces"


def test_fast_sampler_on_gpu_matches_the_fp32_cpu_sampler(faces):
    from mdland.data.shards import landmarks_array, read_dataset
    from mdland.generation.sampler import LandmarkSampler
    from mdland.landmarks.render import render_landmarks

    points = landmarks_array(read_dataset(str(faces)))[:4]
    conditions = np.stack([render_landmarks(p, 64) for p in points])
    prompts, seeds = ["a portrait of cartoon style"] * 4, [1, 2, 3, 4]
    reference = LandmarkSampler(build_preset("tiny"), build_controlnet(build_preset("tiny")),
                                num_inference_steps=5)(conditions, prompts, seeds)
    fast = LandmarkSampler(build_preset("tiny"), build_controlnet(build_preset("tiny")), "cuda", torch.float16,
                           num_inference_steps=5, channels_last=True)(conditions, prompts, seeds)
    assert np.abs(fast - reference).max() < 0.05  # fp16 tolerance on [0, 1] images


def test_bf16_controlnet_training_on_gpu_exports_fp32(faces, tmp_path):
    from diffusers import ControlNetModel

    from mdland.diffusion.train import ControlNetTrainConfig, run_training

    cfg = ControlNetTrainConfig(model="tiny", data=str(faces), resolution=64, batch_size=4, max_steps=4,
                                checkpoint_every=4, use_gpu=True, num_validation=2, validation_steps=2,
                                storage_path=str(tmp_path), name="gpu")
    result = run_training(cfg, local=True)
    weights = ControlNetModel.from_pretrained(result["export"]).state_dict()
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert sum(not torch.equal(v, v.bfloat16().float()) for v in weights.values()) > 50


def test_bf16_detector_training_on_gpu(faces, tmp_path):
    from mdland.detector.train import DetectorTrainConfig, run_training

    cfg = DetectorTrainConfig(arch="tiny", data=[str(faces)], val_data=str(faces), epochs=2, batch_size=8,
                              learning_rate=1e-3, use_gpu=True, storage_path=str(tmp_path), name="gpu")
    result = run_training(cfg, local=True)
    assert result["epoch"] == 2 and np.isfinite(result["best_val_nme"])

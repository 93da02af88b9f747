"""The GPU paths, run on purpose on a CUDA machine (`pytest -m gpu`); skipped without one."""

import numpy as np
import pytest
import torch

from mdland.cluster import init_ray
from mdland.data.procedural import write_faces
from mdland.diffusion.models import build_controlnet, build_preset

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    write_faces(str(root / "faces"), 16, seed=0, size=64)
    return root / "faces"


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    """A tiny ControlNet whose zero convolutions are not zero, so the sampler's ControlNet path shows in the images."""
    torch.manual_seed(1)
    controlnet = build_controlnet(build_preset("tiny"))
    for p in controlnet.parameters():
        p.data += 0.01 * torch.randn_like(p)
    path = tmp_path_factory.mktemp("controlnet") / "controlnet"
    controlnet.save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 0.05), (torch.bfloat16, 0.1)])
def test_fast_sampler_on_gpu_matches_the_fp32_cpu_sampler(faces, controlnet_dir, dtype, tolerance):
    from diffusers import ControlNetModel

    from mdland.data.shards import landmarks_array, read_dataset
    from mdland.generation.sampler import LandmarkSampler
    from mdland.landmarks.render import render_landmarks

    points = landmarks_array(read_dataset(str(faces)))[:4]
    conditions = np.stack([render_landmarks(p, 64) for p in points])
    prompts, seeds = ["a portrait of cartoon style"] * 4, [1, 2, 3, 4]
    reference = LandmarkSampler(build_preset("tiny"), ControlNetModel.from_pretrained(controlnet_dir),
                                num_inference_steps=5)(conditions, prompts, seeds)
    # The generation defaults: half precision, channels-last, fused attention projections.
    fast = LandmarkSampler(build_preset("tiny"), ControlNetModel.from_pretrained(controlnet_dir), "cuda", dtype,
                           num_inference_steps=5, channels_last=True, fuse_qkv=True)
    images = fast(conditions, prompts, seeds)
    assert np.abs(images - reference).max() < tolerance  # on [0, 1] images
    # A sample generated alone matches itself in a batch, up to the kernels' numerics at another batch size.
    alone = fast(conditions[2:3], prompts[2:3], seeds[2:3])
    assert np.abs(alone[0] - images[2]).max() < tolerance


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_sampler_matches_the_eager_one_and_pads_a_short_batch(faces, controlnet_dir, mode):
    from diffusers import ControlNetModel

    from mdland.data.shards import landmarks_array, read_dataset
    from mdland.generation.sampler import LandmarkSampler
    from mdland.landmarks.render import render_landmarks

    torch._dynamo.reset()
    points = landmarks_array(read_dataset(str(faces)))[:3]
    conditions = np.stack([render_landmarks(p, 64) for p in points])
    prompts, seeds = ["a portrait of cartoon style"] * 3, [1, 2, 3]

    def sampler(**kw):
        return LandmarkSampler(build_preset("tiny"), ControlNetModel.from_pretrained(controlnet_dir), "cuda",
                               torch.float16, num_inference_steps=4, **kw)

    eager = sampler()(conditions, prompts, seeds)
    compiled = sampler(compile=True, compile_mode=mode)
    # Twice: with CUDA graphs, the second call replays them (one generation per step, or the UNet would read the
    # ControlNet's freed outputs).
    for _ in range(2):
        assert np.abs(compiled(conditions, prompts, seeds) - eager).max() < 0.02
    short = compiled(conditions[:2], prompts[:2], seeds[:2])
    assert short.shape[0] == 2 and compiled.compiled_batch == 3  # padded to the compiled size, not recompiled
    assert np.abs(short - eager[:2]).max() < 0.02


def test_bf16_controlnet_training_on_gpu_exports_fp32(faces, tmp_path):
    from diffusers import ControlNetModel

    from mdland.diffusion.train import ControlNetTrainConfig, run_training

    cfg = ControlNetTrainConfig(model="tiny", data=[str(faces)], resolution=64, batch_size=4, max_steps=4,
                                checkpoint_every=4, use_gpu=True, num_validation=2, validation_steps=2,
                                storage_path=str(tmp_path), name="gpu")
    result = run_training(cfg, local=True)
    weights = ControlNetModel.from_pretrained(result["export"]).state_dict()
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert sum(not torch.equal(v, v.bfloat16().float()) for v in weights.values()) > 50


def test_ray_controlnet_training_on_gpu_encodes_latents_first(faces, tmp_path):
    # The encoding actors must give the GPU back before the Ray Train worker can have it.
    from mdland.diffusion.train import ControlNetTrainConfig, run_training

    cfg = ControlNetTrainConfig(model="tiny", data=[str(faces)], resolution=64, batch_size=4, max_steps=4,
                                checkpoint_every=4, use_gpu=True, num_validation=2, validation_steps=2,
                                storage_path=str(tmp_path), name="gpu-ray", cache_latents=True)
    result = run_training(cfg)
    assert result["step"] == 4 and np.isfinite(result["probe_loss"])


def test_bf16_detector_training_on_gpu(faces, tmp_path):
    from mdland.detector.train import DetectorTrainConfig, run_training

    cfg = DetectorTrainConfig(arch="tiny", data=[str(faces)], val_data=[str(faces)], epochs=2, batch_size=8,
                              learning_rate=1e-3, use_gpu=True, storage_path=str(tmp_path), name="gpu")
    result = run_training(cfg, local=True)
    assert result["epoch"] == 2 and np.isfinite(result["best_val_nme"])


def test_generation_pipeline_on_gpu_writes_the_planned_set(faces, tmp_path):
    # With use_gpu the actors hand uint8 images to separate CPU encode tasks.
    from mdland.data.shards import decode_image, read_dataset
    from mdland.generation.pipeline import run_generation
    from mdland.generation.plan import GenerateConfig

    torch.manual_seed(0)
    build_controlnet(build_preset("tiny")).save_pretrained(tmp_path / "controlnet")
    init_ray(include_dashboard=False)
    out = run_generation(GenerateConfig(source=[str(faces)], output=str(tmp_path / "out"),
                                        controlnet=str(tmp_path / "controlnet"), styles=["cartoon", "anime"],
                                        images_per_style=8, resolution=64, num_inference_steps=4, rows_per_shard=8,
                                        batch_size=4, use_gpu=True))
    table = read_dataset(str(tmp_path / "out"))
    assert out["complete"] and table.num_rows == 16
    assert decode_image(table.column("image")[0].as_py()).shape == (64, 64, 3)


def test_cuda_graph_detector_matches_the_eager_network():
    import gc
    import weakref

    from mdland.detector.inference import CudaGraphDetector, crop_landmarks
    from mdland.detector.model import ARCHS, STARNet
    from mdland.session import pick_device

    device = pick_device(use_gpu=True)  # with cuDNN autotuning, as serving runs: capture must not autotune
    torch.manual_seed(0)
    net = STARNet(ARCHS["tiny"]).to(device).eval().half()
    size = net.arch.input_size
    crops = torch.randint(0, 256, (27, size, size, 3), dtype=torch.uint8)
    with torch.no_grad():
        eager = torch.cat([crop_landmarks(net, crops[i : i + 1].to(device), torch.float16).cpu() for i in range(27)])
        eager12 = crop_landmarks(net, crops[:12].to(device), torch.float16).cpu()
    assert (eager[1:] - eager[:-1]).abs().mean(dim=(1, 2)).min() > 0.5  # faces' points tell apart: mixing shows
    graphed = CudaGraphDetector(net, torch.float16, 12)
    assert graphed.sizes == [1, 2, 3, 4, 5, 6, 7, 8, 12]
    # The caller's network may go: the graphs keep reading its weights (so it must stay alive), and reused memory
    # would show in the points.
    alive = weakref.ref(net)
    del net
    gc.collect()
    assert alive() is not None
    torch.cuda.empty_cache()
    filler = torch.full((64, 2**20), 7.0, device=device)
    assert (graphed(crops[:12]) - eager12).abs().max() < 0.05  # the same batch size: the same kernels
    for n in (1, 5, 8, 9, 12, 27):  # 9 runs padded in the graph of 12; 27 in chunks of 12, 12 and 3
        points = graphed(crops[:n])
        assert points.shape == (n, 68, 2) and points.device.type == "cpu"
        error = (points - eager[:n]).abs()  # crop pixels, fp16 at another batch size than eager's 1
        assert error.mean() < 0.05 and error.max() < 0.5, (n, error.mean(), error.max())
    graphed(crops[15:27])  # a padded batch's points do not depend on the older faces in its padding rows
    assert (graphed(crops[:9]) - eager[:9]).abs().mean() < 0.05
    assert filler.eq(7.0).all()

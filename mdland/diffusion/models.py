"""Stable Diffusion 1.x components and the landmark ControlNet.

Real runs load a diffusers-format directory (local, or `s3://` copied once per node into a local cache). Two presets
build random-initialised components from configs in code, so nothing is ever fetched from a model hub:
- `tiny`: a few hundred thousand parameters per part, for tests and the demo on a CPU;
- `sd15`: the real SD 1.5 architecture (UNet ~860M, ControlNet ~361M, CLIP ViT-L/14 text encoder), for GPU benchmarks.
Both use a CLIP BPE tokenizer that mdland writes from a small character-level vocabulary.
"""

import fcntl
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from mdland.data import storage

PRESETS = ("tiny", "sd15")
# What loading reads from a diffusers-format SD directory, besides model_index.json, and the file each must have.
SUBFOLDERS = {"vae": "config.json", "unet": "config.json", "text_encoder": "config.json",
              "tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json"}
MAX_PROMPT_TOKENS = 77

# SD 1.x's training noise schedule.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")

_ARCH = {
    "tiny": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
                  norm_num_groups=8, sample_size=32),
        vae=dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=256,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2),
    ),
    "sd15": dict(
        unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                  attention_head_dim=8, sample_size=64,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                  vocab_size=49408, hidden_act="quick_gelu", projection_dim=768),
    ),
}


@dataclass
class SDComponents:
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    model_id: str

    def frozen_to(self, device: torch.device | str, dtype: torch.dtype) -> "SDComponents":
        """Move the frozen parts to `device`/`dtype`, in eval mode with no gradients."""
        for module in (self.vae, self.unet, self.text_encoder):
            module.requires_grad_(False).eval().to(device, dtype=dtype)
        return self


class PromptEmbeddings:
    """Text-encoder outputs per prompt, each computed once: training has one to a few dozen prompts, and so has
    generation (25 styles and the empty prompt)."""

    def __init__(self, components: SDComponents, device: torch.device | str):
        self.components, self.device = components, torch.device(device)
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        tok = self.components.tokenizer
        missing = sorted(set(prompts) - self.cache.keys())
        if missing:
            # A tokenizer config without `model_max_length` gives a huge one; the encoder's positions bound it.
            length = min(tok.model_max_length, self.components.text_encoder.config.max_position_embeddings)
            ids = tok(missing, padding="max_length", max_length=length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            self.cache.update(zip(missing, self.components.text_encoder(ids)[0]))
        return torch.stack([self.cache[p] for p in prompts])


def char_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single characters (no merges): any prompt tokenises, nothing is downloaded."""
    # CLIP's byte-to-unicode table: printable bytes map to themselves, the rest to code points from 256 on.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    # Files private to this call: workers starting together on one node must not read each other's half-written
    # files. The tokenizer reads them when it is built and keeps nothing on disk.
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"),
                             model_max_length=MAX_PROMPT_TOKENS, pad_token="<|endoftext|>")


def _preset_vae(name: str, seed: int) -> AutoencoderKL:
    """A preset's VAE: seeded, and drawn before the other modules, so `load_vae` can build it alone."""
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **_ARCH[name]["vae"])


def build_preset(name: str, seed: int = 0) -> SDComponents:
    """Random-initialised components of preset `name`; the same seed gives the same weights on every worker."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {PRESETS} or give a model directory")
    arch = _ARCH[name]
    tokenizer = char_tokenizer()
    vae = _preset_vae(name, seed)
    text_cfg = dict(vocab_size=len(tokenizer), max_position_embeddings=MAX_PROMPT_TOKENS,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    text_cfg.update(arch["text"])
    return SDComponents(
        vae=vae,
        unet=UNet2DConditionModel(in_channels=4, out_channels=4, **arch["unet"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)),
        tokenizer=tokenizer,
        noise_scheduler=DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"}),
        model_id=f"preset:{name}",
    )


def save_components(components: SDComponents, directory: str | Path) -> None:
    """Write components as a diffusers-format directory (what `load_components` and diffusers pipelines read)."""
    directory = Path(directory)
    for sub, part in (("vae", components.vae), ("unet", components.unet), ("text_encoder", components.text_encoder),
                      ("tokenizer", components.tokenizer), ("scheduler", components.noise_scheduler)):
        part.save_pretrained(directory / sub)
    (directory / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": __import__("diffusers").__version__,
        "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    }, indent=1))


def _cache_root() -> Path:
    return Path(os.environ.get("MDLAND_CACHE", Path.home() / ".cache" / "mdland"))


def needed_files(files: list[str], subfolders: tuple[str, ...] | None = None) -> list[str]:
    """The files of a diffusers-format directory that loading reads: with `subfolders`, only theirs and
    `model_index.json`; without, those at the top (a single model's folder, e.g. a ControlNet export); and of a
    weights file's variants (`.fp16`, `.non_ema`), the plain file when there is one, safetensors over bin. A Hugging
    Face snapshot of SD 1.5 also holds single-file checkpoints, a safety checker, those variants and both formats of
    the text encoder: tens of GB that every node would otherwise copy."""
    present = set(files)
    safetensors = {(f.rpartition("/")[0], _variant(f)) for f in files if f.endswith(".safetensors")}
    keep = []
    for f in files:
        folder, _, name = f.rpartition("/")
        if subfolders is None:
            if folder:
                continue
        elif not (folder.split("/")[0] in subfolders if folder else name == "model_index.json"):
            continue
        stem, _, ext = name.rpartition(".")
        if ext in ("safetensors", "bin"):
            base, dot, _ = stem.rpartition(".")
            if dot and posixpath.join(folder, f"{base}.{ext}") in present:  # a variant beside the plain file
                continue
            # a .bin beside safetensors of its variant (transformers names them pytorch_model.bin, model.safetensors)
            if ext == "bin" and (folder, _variant(f)) in safetensors:
                continue
        keep.append(f)
    return keep


def _variant(path: str) -> str:
    """A weights file's variant: "fp16" for `model.fp16.safetensors`, "" for `model.safetensors`."""
    stem = path.rpartition("/")[2].rpartition(".")[0]
    return stem.rpartition(".")[2] if "." in stem else ""


def weights_variant(folder: Path) -> str | None:
    """"fp16" for a folder that holds only fp16 weights (a snapshot downloaded with `--include '*fp16*'`)."""
    weights = [p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    return "fp16" if weights and all(".fp16" in w for w in weights) else None


@contextmanager
def local_copy(uri: str, subfolders: tuple[str, ...] | None = None) -> Iterator[Path]:
    """A local directory holding `uri` (the files of it that loading reads, `needed_files`) for the `with` block: the
    path itself, or for `s3://` a copy made once per node and again when those files change (a re-published export).
    Older copies are removed once no process is loading from them."""
    if not storage.is_s3(uri):
        yield Path(uri)
        return
    models = _cache_root() / "models"
    models.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha1(uri.rstrip("/").encode()).hexdigest()[:16]
    select = partial(needed_files, subfolders=subfolders)
    with open(models / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for _ in range(3):
            version = storage.fingerprint(uri, select)
            target = models / f"{name}-{version}"
            _remove_unused_copies(models, name, target)
            if (target / ".complete").exists():
                break
            try:
                storage.copy_to_local(uri, target, select)
            except storage.StorageError:
                # A file gone since the listing is a re-publish under way, retried as any other change is.
                if storage.fingerprint(uri, select) == version:
                    raise
            else:
                if storage.fingerprint(uri, select) == version:  # not re-published while it was copied
                    (target / ".complete").write_text(uri)
                    break
            shutil.rmtree(target, ignore_errors=True)
        else:
            raise storage.StorageError(f"{uri}: changed while it was copied, three times; try again once published")
        in_use = open(models / f"{target.name}.in-use", "w")
        fcntl.flock(in_use, fcntl.LOCK_SH)  # taken under the node lock: no removal comes in between
    try:
        yield target
    finally:
        in_use.close()


def _remove_unused_copies(models: Path, name: str, current: Path) -> None:
    """Remove the copies of model `name` other than `current` that no process is loading from (each reader holds its
    copy's in-use lock). Called under the node lock, under which readers take theirs."""
    for copy in models.glob(f"{name}-*"):
        if not copy.is_dir() or copy == current:
            continue
        marker = models / f"{copy.name}.in-use"
        with open(marker, "w") as in_use:
            try:
                fcntl.flock(in_use, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            shutil.rmtree(copy, ignore_errors=True)
            marker.unlink()


def check_model_dir(uri: str) -> None:
    """Fail fast, before any worker starts, when `uri` is not a diffusers-format SD directory."""
    if uri in PRESETS:
        return
    missing = [f"{sub}/{f}" for sub, f in SUBFOLDERS.items() if not storage.exists(storage.join(uri, sub, f))]
    if missing:
        raise ValueError(f"model: {uri} is neither a preset ({', '.join(PRESETS)}) nor a diffusers-format Stable "
                         f"Diffusion directory (no {', '.join(missing)})")


# What a ControlNet copies from its UNet (`ControlNetModel.from_unet`): its residuals fit no UNet that differs here.
UNET_SHAPE_KEYS = ("in_channels", "block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim",
                   "attention_head_dim")


def check_controlnet(controlnet: str, model: str) -> None:
    """Fail before any worker starts when `controlnet` is not a ControlNet export, or one made from a UNet shaped
    unlike `model`'s (a preset or a diffusers-format directory): the forward pass would fail on a tensor size."""
    try:
        made = json.loads(storage.read_bytes(storage.join(controlnet, "config.json")))
    except storage.NotFound:
        raise ValueError(f"controlnet: {controlnet!r} is not a ControlNet export (no config.json)") from None
    except ValueError as e:
        raise ValueError(f"controlnet: {controlnet}/config.json is not JSON ({e})") from None
    unet = ({"in_channels": 4, **_ARCH[model]["unet"]} if model in PRESETS
            else json.loads(storage.read_bytes(storage.join(model, "unet", "config.json"))))
    for key in UNET_SHAPE_KEYS:
        if key in made and key in unet and json.loads(json.dumps(made[key])) != json.loads(json.dumps(unet[key])):
            raise ValueError(f"controlnet: {controlnet} was made from another UNet than model {model}'s ({key} "
                             f"{made[key]} against {unet[key]}); use one trained from this model")


def load_components(model: str, seed: int = 0) -> SDComponents:
    """SD components from a preset name or a diffusers-format directory (local or s3://)."""
    if model in PRESETS:
        return build_preset(model, seed=seed)
    check_model_dir(model)
    with local_copy(model, tuple(SUBFOLDERS)) as path:
        return SDComponents(
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", variant=weights_variant(path / "vae")),
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=weights_variant(path / "unet")),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder",
                                                       variant=weights_variant(path / "text_encoder")),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
            model_id=model,
        )


def load_vae(model: str, seed: int = 0) -> AutoencoderKL:
    """The VAE of `load_components(model, seed)`, without loading or building the rest."""
    if model in PRESETS:
        return _preset_vae(model, seed)
    check_model_dir(model)
    with local_copy(model, tuple(SUBFOLDERS)) as path:
        return AutoencoderKL.from_pretrained(path, subfolder="vae", variant=weights_variant(path / "vae"))


def latent_distribution(vae: AutoencoderKL, images: torch.Tensor, dtype: torch.dtype):
    """The VAE's latent distribution (diffusers' `DiagonalGaussianDistribution`) of uint8 (B, 3, H, W) images, scaled
    to [-1, 1] on their device and encoded in `dtype`."""
    return vae.encode((images.float() / 127.5 - 1.0).to(dtype)).latent_dist


def build_controlnet(components: SDComponents, init: str | None = None) -> ControlNetModel:
    """The trainable ControlNet: loaded from `init` (a `save_pretrained` export, e.g. stage 1's) or copied from the
    UNet's encoder (`ControlNetModel.from_unet`), as the method's stage 1 does."""
    if init:
        if not storage.exists(storage.join(init, "config.json")):
            raise ValueError(f"{init}: not a ControlNet export (no config.json)")
        with local_copy(init) as path:
            return ControlNetModel.from_pretrained(path, variant=weights_variant(path))
    return ControlNetModel.from_unet(components.unet)


def ddim_scheduler(components: SDComponents) -> DDIMScheduler:
    """The sampling scheduler. DDPM's config has no `set_alpha_to_one`, and DDIM's default (True) is not SD 1.x's;
    a scheduler config without `clip_sample` gives DDPM's default (True), which would clip DDIM's latents."""
    return DDIMScheduler.from_config(components.noise_scheduler.config, clip_sample=False,
                                     set_alpha_to_one=SCHEDULER_CONFIG["set_alpha_to_one"])

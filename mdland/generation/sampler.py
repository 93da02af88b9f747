"""mdland's sampler: DDIM + classifier-free guidance over diffusers modules, without the stock pipeline.

With the fast options off it computes what `StableDiffusionControlNetPipeline` computes for the same seeds (one CPU
generator per sample, DDIM, both guidance halves in one batch); the fast options are half precision, channels-last
memory, fused q/k/v projections in the UNet, `torch.compile`, one text encoding per prompt for the whole run, one
condition embedding per image for all its steps and both guidance halves, and VAE decoding in chunks.
Each sample's initial noise comes from its own seed, so a sample comes out the same in any batch.
"""

from contextlib import contextmanager

import numpy as np
import torch

from mdland.diffusion.models import PromptEmbeddings, SDComponents, ddim_scheduler


class LandmarkSampler:
    def __init__(self, components: SDComponents, controlnet, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 eta: float = 0.0, channels_last: bool = False, compile: bool = False, vae_batch_size: int = 16,
                 fuse_qkv: bool = False, compile_mode: str | None = None):
        self.device, self.dtype = torch.device(device), dtype
        self.components = components.frozen_to(self.device, dtype)
        self.controlnet = controlnet.requires_grad_(False).eval().to(self.device, dtype=dtype)
        self.controlnet_module = self.controlnet  # torch.compile wraps it; its submodules are swapped on this one
        self.bypass = torch.nn.Identity()
        self.unet, self.vae = self.components.unet, self.components.vae
        if fuse_qkv:  # one matmul for each UNet self-attention's q, k and v (diffusers fuses no ControlNet)
            self.unet.fuse_qkv_projections()
        if channels_last:
            for m in (self.unet, self.controlnet, self.vae):
                m.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes for the whole run: let cuDNN pick its kernels
        self.compiled, self.compiled_batch = compile, 0
        if compile:
            self.unet = torch.compile(self.unet, mode=compile_mode)
            self.controlnet = torch.compile(self.controlnet, mode=compile_mode)
        self.scheduler = ddim_scheduler(components)
        self.steps, self.guidance, self.eta, self.vae_batch = num_inference_steps, guidance_scale, eta, vae_batch_size
        self.encode = PromptEmbeddings(self.components, self.device)

    @property
    def guided(self) -> bool:
        return self.guidance > 1.0

    def initial_noise(self, generators: list[torch.Generator], height: int, width: int) -> torch.Tensor:
        shape = (1, self.unet.config.in_channels, height // 8, width // 8)
        # Drawn in fp32 and then cast: PyTorch's CPU normal sampler draws other numbers in fp16/bf16 on some
        # versions, and a seed must give the same image whatever the precision.
        noise = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
        return (torch.cat(noise) * self.scheduler.init_noise_sigma).to(self.device, self.dtype)

    @torch.no_grad()
    def __call__(self, conditions: np.ndarray, prompts: list[str], seeds: list[int]) -> np.ndarray:
        """(B, H, W, 3) uint8 condition images -> (B, H, W, 3) float images in [0, 1]."""
        conditions = np.array(conditions, dtype=np.uint8)  # a writable copy: Ray hands batches over read-only
        b, h, w, _ = conditions.shape
        if not (len(prompts) == len(seeds) == b):
            raise ValueError(f"got {b} conditions, {len(prompts)} prompts and {len(seeds)} seeds")
        if self.compiled:
            # A smaller batch (a run's last) is padded to the size compiled for, instead of compiling again for it;
            # the padding repeats the last sample, and samples do not depend on their batch.
            self.compiled_batch = self.compiled_batch or b
            pad = self.compiled_batch - b
            if pad > 0:
                return self(np.concatenate([conditions, np.repeat(conditions[-1:], pad, axis=0)]),
                            [*prompts, *[prompts[-1]] * pad], [*seeds, *[seeds[-1]] * pad])[:b]
        image = torch.from_numpy(conditions).to(self.device).permute(0, 3, 1, 2).to(self.dtype) / 255.0
        embedded = self.embed_condition(image)
        hidden = self.encode(list(prompts))
        if self.guided:
            hidden = torch.cat([self.encode([""] * b), hidden])
            embedded = torch.cat([embedded, embedded])
        # One CPU generator per sample gives its initial noise and then its DDIM step noise, as the stock pipeline
        # draws them, so a sample is independent of its batch.
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        latents = self.initial_noise(generators, h, w)
        self.scheduler.set_timesteps(self.steps, device=self.device)
        with self.embedding_bypassed():
            latents = self.denoise(latents, hidden, embedded, generators)
        return self.decode(latents)

    @contextmanager
    def embedding_bypassed(self):
        """The ControlNet takes `embed_condition`'s output in place of the condition images, and has its own
        embedding back afterwards (the module stays usable by a stock pipeline)."""
        embedding = self.controlnet_module.controlnet_cond_embedding
        self.controlnet_module.controlnet_cond_embedding = self.bypass
        try:
            yield
        finally:
            self.controlnet_module.controlnet_cond_embedding = embedding

    def embed_condition(self, image: torch.Tensor) -> torch.Tensor:
        """The ControlNet's condition embedding of `image`, as its forward takes it while the embedding is bypassed.

        The condition is the same at every step and in both guidance halves, so it is embedded once per image
        instead of twice a step."""
        if self.controlnet_module.config.controlnet_conditioning_channel_order == "bgr":
            # The forward flips a BGR ControlNet's condition before embedding it: flipped here, the bypass gets it back.
            return self.controlnet_module.controlnet_cond_embedding(image.flip(1)).flip(1)
        return self.controlnet_module.controlnet_cond_embedding(image)

    def denoise(self, latents: torch.Tensor, hidden: torch.Tensor, embedded: torch.Tensor,
                generators: list[torch.Generator]) -> torch.Tensor:
        """The DDIM loop; `embedded`: the conditions' embedding (`embed_condition`), taken while it is bypassed."""
        # DDIM's step indexes its CPU tables with the timestep: given the GPU tensor, it would wait for the device
        # three times a step; the networks take the tensor.
        for t, step in zip(self.scheduler.timesteps, self.scheduler.timesteps.tolist()):
            if self.compiled:
                # One CUDA-graph generation per step (compile modes with CUDA graphs): otherwise calling the compiled
                # UNet starts a new one, which frees the compiled ControlNet's outputs it is about to read.
                torch.compiler.cudagraph_mark_step_begin()
            model_in = torch.cat([latents, latents]) if self.guided else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            down, mid = self.controlnet(model_in, t, encoder_hidden_states=hidden, controlnet_cond=embedded,
                                        conditioning_scale=1.0, return_dict=False)
            pred = self.unet(model_in, t, encoder_hidden_states=hidden, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid, return_dict=False)[0]
            if self.guided:
                uncond, cond = pred.chunk(2)
                pred = uncond + self.guidance * (cond - uncond)
            noise = None
            if self.eta > 0:
                noise = torch.cat([torch.randn((1, *latents.shape[1:]), generator=g, dtype=torch.float32)
                                   for g in generators]).to(self.device, self.dtype)
            latents = self.scheduler.step(pred, step, latents, eta=self.eta, variance_noise=noise,
                                          return_dict=False)[0]
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> (B, H, W, 3) float images in [0, 1], decoded `vae_batch_size` at a time, copied back once."""
        sf = self.vae.config.scaling_factor
        images = torch.cat([self.vae.decode(c / sf, return_dict=False)[0] for c in latents.split(self.vae_batch)])
        return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] -> uint8, rounded as diffusers' `numpy_to_pil` does."""
    return (images * 255).round().astype(np.uint8)

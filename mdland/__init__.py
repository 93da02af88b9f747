"""mdland: multi-domain face landmark detection from diffusion-made synthetic data."""

__version__ = "0.1.0"

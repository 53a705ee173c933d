"""The KL autoencoder stage: 512x512x3 images in [-1, 1] <-> 4x64x64 latents (f = 8)."""

from .config import PRESETS, VAEConfig, VAETrainConfig
from .model import AutoencoderKL, DiagonalGaussian

__all__ = ["PRESETS", "VAEConfig", "VAETrainConfig", "AutoencoderKL", "DiagonalGaussian"]

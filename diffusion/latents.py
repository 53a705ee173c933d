"""What the UNet trains on, computed once: VAE posterior moments and frozen CLIP text states.

The VAE and the text encoder are frozen during UNet training, so running them every step would only burn
time. Each training image and its horizontal mirror is encoded once to its posterior ``N(mean, exp(logvar))``
(saved to disk, keyed by the VAE and data fingerprints, so a resumed or repeated run skips the encoding);
each step draws a fresh latent from it. Every caption, English and Chinese, and the empty prompt are encoded
once; each step picks a language per sample and drops captions for classifier-free guidance.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from data import language_mask
from data.augment import float_batches
from engine.precision import inference_autocast
from engine.stage import atomic_write


def cache_key(*fingerprints: str) -> str:
    """A short file-name-safe key for the combination of the given fingerprints."""
    return hashlib.sha256("|".join(fingerprints).encode()).hexdigest()[:16]


@torch.no_grad()
def encode_moments(vae: torch.nn.Module, images_uint8: Tensor, batch_size: int,
                   device: torch.device) -> tuple[Tensor, Tensor]:
    """Posterior mean and log-variance ``[N, C, h, w]`` (float32, on ``device``) of uint8 images ``[N, 3, H, W]``."""
    means, logvars = [], []
    for images in float_batches(images_uint8, batch_size, device):
        with inference_autocast(device):
            posterior = vae.encode(images)
        means.append(posterior.mean.float())
        logvars.append(posterior.logvar.float())
    return torch.cat(means), torch.cat(logvars)


@dataclass
class LatentCache:
    """Posterior moments of ``N`` images followed by their mirrors (rows ``i`` and ``i + N`` share a source).

    ``mean`` and ``logvar`` are ``[R, C, h, w]`` with ``R = 2N`` (or ``N`` when built without mirrors);
    ``scaling_factor`` is the VAE's, so sampled latents have roughly unit variance.
    """

    mean: Tensor
    logvar: Tensor
    num_images: int
    scaling_factor: float

    def __len__(self) -> int:
        return self.mean.shape[0]

    def image_ids(self, rows: Tensor) -> Tensor:
        """The source image of each row (a mirror maps to its original)."""
        return rows % self.num_images

    def sample(self, rows: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents ``scaling_factor * (mean + exp(logvar / 2) * noise)`` of ``rows``."""
        mean, logvar = self.mean[rows], self.logvar[rows]
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.scaling_factor * (mean + torch.exp(0.5 * logvar) * noise)

    def scaled_mean(self) -> Tensor:
        """Scaled posterior means of every row (the deterministic latents used for validation)."""
        return self.scaling_factor * self.mean

    def save(self, path: str | Path) -> None:
        tensors = {"mean": self.mean.cpu().contiguous(), "logvar": self.logvar.cpu().contiguous()}
        metadata = {"num_images": str(self.num_images), "scaling_factor": repr(self.scaling_factor)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "LatentCache":
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata()
        tensors = load_file(str(path), device=str(device))
        return cls(tensors["mean"], tensors["logvar"], int(metadata["num_images"]), float(metadata["scaling_factor"]))


def build_latent_cache(vae: torch.nn.Module, images_uint8: Tensor, path: str | Path, batch_size: int,
                       device: torch.device, mirror: bool = True) -> LatentCache:
    """Load the cache at ``path`` or encode ``images_uint8`` (and their mirrors) and save it there."""
    path = Path(path)
    if path.is_file():
        return LatentCache.load(path, device)
    scaling_factor = vae.config.scaling_factor
    if scaling_factor is None:
        raise ValueError("the VAE stage has no scaling_factor (it is measured at the end of VAE training); "
                         "finish the VAE stage or pass a finished one")
    if mirror:
        images_uint8 = torch.cat([images_uint8, images_uint8.flip(-1)])
    mean, logvar = encode_moments(vae, images_uint8, batch_size, device)
    cache = LatentCache(mean, logvar, len(images_uint8) // (2 if mirror else 1), float(scaling_factor))
    cache.save(path)
    return cache


@torch.no_grad()
def encode_prompts(clip: torch.nn.Module, prompts: list[str], batch_size: int = 256) -> Tensor:
    """Text states ``[len(prompts), L, D]`` in batches (the text encoder is frozen)."""
    return torch.cat([clip.text_states(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)])


@dataclass
class TextStateCache:
    """Text states of every caption in both languages, ``[N, L, D]`` each, and of the empty prompt ``[L, D]``."""

    en: Tensor
    zh: Tensor
    null: Tensor

    @classmethod
    def build(cls, clip: torch.nn.Module, en: list[str], zh: list[str]) -> "TextStateCache":
        if len(en) != len(zh):
            raise ValueError(f"got {len(en)} English but {len(zh)} Chinese captions; give one of each per image")
        return cls(encode_prompts(clip, en), encode_prompts(clip, zh), encode_prompts(clip, [""])[0])

    def contexts(self, image_ids: Tensor, zh_prob: float, drop_prob: float,
                 generator: torch.Generator | None = None) -> Tensor:
        """One caption's states per sample: Chinese with ``zh_prob``, then the null state with ``drop_prob``."""
        use_zh = language_mask(len(image_ids), zh_prob, generator, device=image_ids.device)
        drop = torch.rand(len(image_ids), device=image_ids.device, generator=generator) < drop_prob
        states = torch.where(use_zh[:, None, None], self.zh[image_ids], self.en[image_ids])
        return torch.where(drop[:, None, None], self.null, states)

"""Reconstruction quality and latent statistics of a trained autoencoder, and its latent scaling factor."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from data.augment import float_batches
from engine.precision import inference_autocast
from vae.loss import ssim
from vae.model import AutoencoderKL


def psnr(recon: Tensor, target: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per image ([B]) of [-1, 1] images, measured on the [0, 1] scale."""
    mse = ((recon.float().clamp(-1, 1) - target.float()) / 2).square().mean(dim=(1, 2, 3))
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


class LatentMoments(NamedTuple):
    """Mean and std over every latent element, and per latent channel."""
    mean: float
    std: float
    channel_means: list[float]
    channel_stds: list[float]


class _RunningMoments:
    """Sums and sums of squares in float64 on the device, per channel and over every element: a streaming
    mean/std without per-batch host syncs."""

    def __init__(self) -> None:
        self.count = 0  # elements per channel
        self.sums: Tensor | None = None  # [2, C + 1]: each channel's, then every element's

    def add(self, values: Tensor) -> None:
        v = values.detach().double()
        per_channel = v.transpose(0, 1).flatten(1)  # [C, elements]
        # Every element's sums are taken whole, not added up from the channels', so the scaling factor repeats
        # earlier runs' to the bit.
        sums = torch.stack([torch.cat([per_channel.sum(1), v.sum()[None]]),
                            torch.cat([per_channel.square().sum(1), v.square().sum()[None]])])
        self.sums = sums if self.sums is None else self.sums + sums
        self.count += per_channel.shape[1]

    def moments(self) -> LatentMoments:
        if self.sums is None:
            raise ValueError("no latents were added: give at least one image")
        (*channel_totals, total), (*channel_squares, squares) = self.sums.tolist()
        spread = lambda mean, square: max(square - mean * mean, 0.0) ** 0.5  # noqa: E731
        elements = self.count * len(channel_totals)
        means = [t / self.count for t in channel_totals]
        mean = total / elements
        return LatentMoments(mean, spread(mean, squares / elements), means,
                             [spread(m, q / self.count) for m, q in zip(means, channel_squares)])


@torch.no_grad()
def latent_moments(vae: AutoencoderKL, images_uint8: Tensor, batch_size: int, device: str | torch.device,
                   seed: int = 0) -> LatentMoments:
    """Moments of posterior samples (unscaled) of ``images_uint8`` [N, C, H, W]: over every element and per
    latent channel."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    moments = _RunningMoments()
    for batch in float_batches(images_uint8, batch_size, device):
        with inference_autocast(device):
            posterior = vae.encode(batch)
        moments.add(posterior.sample(generator))
    return moments.moments()


def scaling_factor_of(moments: LatentMoments) -> float:
    """1 / the latents' std over every element, from their ``latent_moments``.

    Measured on our own autoencoder, as the LDM recipe prescribes; the SD constant 0.18215 belongs to another model.
    """
    if not moments.std > 0:
        raise ValueError("latents have zero spread; the autoencoder is degenerate (was it trained?)")
    return 1.0 / moments.std


@torch.no_grad()
def evaluate_reconstruction(vae: AutoencoderKL, images_uint8: Tensor, batch_size: int,
                            device: str | torch.device) -> dict[str, float]:
    """Full-resolution PSNR / SSIM of posterior-mean reconstructions, KL per latent element and latent std.

    Runs in batches of ``batch_size`` so 512-px validation fits in memory; one host sync at the end.
    """
    device = torch.device(device)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # psnr, ssim, kl summed over images
    latents = _RunningMoments()
    for batch in float_batches(images_uint8, batch_size, device):
        with inference_autocast(device):
            posterior = vae.encode(batch)
            recon = vae.decode(posterior.mode())
        recon = recon.float().clamp(-1, 1)
        kl_per_element = posterior.kl() / posterior.mean[0].numel()
        totals += torch.stack([psnr(recon, batch).sum(), ssim(recon, batch).sum(), kl_per_element.sum()]).double()
        latents.add(posterior.mode())
    psnr_sum, ssim_sum, kl_sum = totals.tolist()
    moments = latents.moments()
    count = len(images_uint8)
    return {"psnr": psnr_sum / count, "ssim": ssim_sum / count, "kl": kl_sum / count,
            "latent_mean": moments.mean, "latent_std": moments.std}

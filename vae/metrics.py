"""Reconstruction quality and latent statistics of a trained autoencoder, and its latent scaling factor."""

from __future__ import annotations

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


class _RunningMoments:
    """Sum and sum of squares in float64 on the device: a streaming mean/std without per-batch host syncs."""

    def __init__(self, device: torch.device) -> None:
        self.count = 0
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)

    def add(self, values: Tensor) -> None:
        v = values.detach().double()
        self.count += v.numel()
        self.sums += torch.stack([v.sum(), v.square().sum()])

    def mean_std(self) -> tuple[float, float]:
        total, squares = self.sums.tolist()
        mean = total / self.count
        return mean, max(squares / self.count - mean * mean, 0.0) ** 0.5


@torch.no_grad()
def latent_moments(vae: AutoencoderKL, images_uint8: Tensor, batch_size: int, device: str | torch.device,
                   seed: int = 0) -> tuple[float, float]:
    """Mean and std over every element of posterior samples (unscaled) of ``images_uint8`` [N, C, H, W]."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    moments = _RunningMoments(device)
    for batch in float_batches(images_uint8, batch_size, device):
        with inference_autocast(device):
            posterior = vae.encode(batch)
        moments.add(posterior.sample(generator))
    return moments.mean_std()


def compute_scaling_factor(vae: AutoencoderKL, images_uint8: Tensor, batch_size: int,
                           device: str | torch.device) -> float:
    """1 / std of unscaled posterior samples of the given (training) images: scaled latents get unit variance.

    Measured on our own autoencoder, as the LDM recipe prescribes; the SD constant 0.18215 belongs to another model.
    """
    _, std = latent_moments(vae, images_uint8, batch_size, device)
    if not std > 0:
        raise ValueError("latents have zero spread; the autoencoder is degenerate (was it trained?)")
    return 1.0 / std


@torch.no_grad()
def evaluate_reconstruction(vae: AutoencoderKL, images_uint8: Tensor, batch_size: int,
                            device: str | torch.device) -> dict[str, float]:
    """Full-resolution PSNR / SSIM of posterior-mean reconstructions, KL per latent element and latent std.

    Runs in batches of ``batch_size`` so 512-px validation fits in memory; one host sync at the end.
    """
    device = torch.device(device)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # psnr, ssim, kl summed over images
    latents = _RunningMoments(device)
    for batch in float_batches(images_uint8, batch_size, device):
        with inference_autocast(device):
            posterior = vae.encode(batch)
            recon = vae.decode(posterior.mode())
        recon = recon.float().clamp(-1, 1)
        kl_per_element = posterior.kl() / posterior.mean[0].numel()
        totals += torch.stack([psnr(recon, batch).sum(), ssim(recon, batch).sum(), kl_per_element.sum()]).double()
        latents.add(posterior.mode())
    psnr_sum, ssim_sum, kl_sum = totals.tolist()
    mean, std = latents.mean_std()
    count = len(images_uint8)
    return {"psnr": psnr_sum / count, "ssim": ssim_sum / count, "kl": kl_sum / count,
            "latent_mean": mean, "latent_std": std}

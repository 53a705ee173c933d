"""VAE training objective: L1 + SSIM reconstruction, KL, and a hinge PatchGAN with the LDM adaptive weight."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from vae.discriminator import PatchDiscriminator
from vae.model import AutoencoderKL


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    window = torch.exp(-coords.square() / (2 * sigma**2))
    return window / window.sum()


def ssim(x: Tensor, y: Tensor, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Structural similarity per image ([B]) of [-1, 1] images [B, C, H, W]; differentiable.

    Gaussian-weighted local statistics (Wang et al. 2004, K1=0.01, K2=0.03) over the valid region, averaged
    over channels and positions, on the images mapped to [0, 1]: SSIM's luminance term assumes intensities
    that are not negative (on [-1, 1] it would weigh an error most at mid-grey, where local means cross 0).
    Computed in float32 with autocast off: variances are differences of squares that bf16 cannot resolve.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim expects two image batches [B, C, H, W] of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"ssim needs images of at least {window_size}x{window_size} px (the window size), "
                         f"got {x.shape[-2]}x{x.shape[-1]}; pass a smaller window_size")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = (x.float() + 1) / 2, (y.float() + 1) / 2
        channels = x.shape[1]
        stats = torch.cat([x, y, x * x, y * y, x * y], dim=1)
        window = _gaussian_window(window_size, sigma, x.device)
        groups = stats.shape[1]
        # Separable blur: a horizontal then a vertical 1-D Gaussian, every channel on its own.
        stats = F.conv2d(stats, window.view(1, 1, 1, -1).repeat(groups, 1, 1, 1), groups=groups)
        stats = F.conv2d(stats, window.view(1, 1, -1, 1).repeat(groups, 1, 1, 1), groups=groups)
        mu_x, mu_y, xx, yy, xy = stats.split(channels, dim=1)
        var_x, var_y, cov = xx - mu_x.square(), yy - mu_y.square(), xy - mu_x * mu_y
        c1, c2 = 0.01 ** 2, 0.03 ** 2  # (K * data range)^2, the range 1
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
        return ssim_map.mean(dim=(1, 2, 3))


def hinge_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(nll: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """||d nll / d last_layer|| / (||d g_loss / d last_layer|| + 1e-4), clamped and detached (LDM, Esser et al.).

    Balances the adversarial gradient against the reconstruction gradient at the decoder's output layer.
    """
    nll_grad, = torch.autograd.grad(nll, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


@dataclass
class VAELossConfig:
    """Weights of the loss terms and when the adversarial term starts (set from ``VAETrainConfig``)."""

    l1: float = 1.0
    ssim: float = 0.2
    kl: float = 1e-5  # per latent element
    gan: float = 0.1  # multiplies the adaptive weight
    disc_start_step: int = 0  # first step with the generator's adversarial term


class VAETrainingModule(nn.Module):
    """Autoencoder + discriminator under one forward, one backward and one optimizer.

    The discriminator's loss sees detached reconstructions, so it only reaches the discriminator; the
    generator's adversarial term runs the discriminator with detached parameters, so it only reaches the
    autoencoder. The discriminator trains from step 0 (the compute is spent anyway, since DDP needs every
    parameter used in every step without ``find_unused_parameters``); from ``disc_start_step`` on its verdict
    also trains the decoder, by which time it is no longer a random critic.
    """

    def __init__(self, model: AutoencoderKL, discriminator: PatchDiscriminator, loss: VAELossConfig) -> None:
        super().__init__()
        self.model = model
        self.discriminator = discriminator
        self.loss = loss

    def forward(self, images: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        w = self.loss
        recon, posterior = self.model(images)
        l1 = (recon - images).abs().mean()
        ssim_loss = 1.0 - ssim(recon, images).mean()
        nll = w.l1 * l1 + w.ssim * ssim_loss
        kl = posterior.kl().mean() / posterior.mean[0].numel()

        # One discriminator pass over real and (detached) fake images: GroupNorm keeps samples independent.
        logits_real, logits_fake = self.discriminator(torch.cat([images, recon.detach()])).chunk(2)
        d_loss = hinge_discriminator_loss(logits_real, logits_fake)
        loss = nll + w.kl * kl + d_loss

        logs = {"l1": l1.detach(), "ssim": 1.0 - ssim_loss.detach(), "kl": kl.detach(), "d_loss": d_loss.detach(),
                "logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}
        zero = images.new_zeros(())  # the same log keys every step, so averages over a log window line up
        g_loss, gan_weight = zero, zero
        gan_on = w.gan > 0 and step >= w.disc_start_step
        if gan_on:
            frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
            g_loss = -functional_call(self.discriminator, frozen, (recon,)).mean()
            gan_weight = w.gan * adaptive_gan_weight(nll, g_loss, self.model.last_layer_weight)
            loss = loss + gan_weight * g_loss
        logs.update(g_loss=g_loss.detach(), gan_weight=gan_weight, disc_on=zero + float(gan_on))
        return loss, logs

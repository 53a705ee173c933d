"""Stable-Diffusion-style KL autoencoder: images in [-1, 1] <-> latents with a diagonal-Gaussian posterior."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.precision import GroupNorm
from engine.stage import StageModel
from vae.config import VAEConfig


class ResnetBlock(nn.Module):
    """Two GroupNorm -> SiLU -> 3x3 conv layers on a residual branch; a 1x1 conv matches widths on the skip."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int) -> None:
        super().__init__()
        self.norm1 = GroupNorm(norm_groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(norm_groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        # The branch starts at zero, so a freshly built deep stack is close to identity and trains stably.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halves the resolution with a stride-2 3x3 conv, padded as ``VAEConfig.downsample_padding`` says."""

    def __init__(self, channels: int, padding: str = "symmetric") -> None:
        super().__init__()
        self.bottom_right = padding == "bottom_right"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.bottom_right else 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.bottom_right else x)


class Upsample(nn.Module):
    """Doubles the resolution: nearest-neighbour resize then a 3x3 conv (no checkerboard of transposed convs)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AttentionBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""

    def __init__(self, channels: int, norm_groups: int) -> None:
        super().__init__()
        self.norm = GroupNorm(norm_groups, channels, eps=1e-6)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.qkv(self.norm(x)).flatten(2).transpose(1, 2)  # [B, HW, 3C]; a view for channels_last
        q, k, v = (t.unsqueeze(1) for t in tokens.chunk(3, dim=-1))  # [B, 1, HW, C] each
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [B, HW, C]
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class MidBlock(nn.Module):
    """ResNet -> attention -> ResNet at the lowest resolution."""

    def __init__(self, channels: int, norm_groups: int) -> None:
        super().__init__()
        self.res1 = ResnetBlock(channels, channels, norm_groups)
        self.attn = AttentionBlock(channels, norm_groups)
        self.res2 = ResnetBlock(channels, channels, norm_groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.res2(self.attn(self.res1(x)))


class Encoder(nn.Module):
    """Image -> posterior moments (mean and log-variance stacked on channels) at 1/f of the resolution."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        channels = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResnetBlock(channels, width, cfg.norm_groups))
                channels = width
            if level < len(widths) - 1:
                layers.append(Downsample(channels, cfg.downsample_padding))
        self.down = nn.Sequential(*layers)
        self.mid = MidBlock(channels, cfg.norm_groups)
        self.norm_out = GroupNorm(cfg.norm_groups, channels, eps=1e-6)
        self.conv_out = nn.Conv2d(channels, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent -> image, mirroring the encoder with one extra ResNet block per level."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        channels = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, channels, 3, padding=1)
        self.mid = MidBlock(channels, cfg.norm_groups)
        layers: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResnetBlock(channels, widths[level], cfg.norm_groups))
                channels = widths[level]
            if level > 0:
                layers.append(Upsample(channels))
        self.up = nn.Sequential(*layers)
        self.norm_out = GroupNorm(cfg.norm_groups, channels, eps=1e-6)
        self.conv_out = nn.Conv2d(channels, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, diag(exp(logvar))) over latents [B, C, h, w]."""

    def __init__(self, moments: Tensor) -> None:
        # float32 even under autocast: exp(logvar), the noise and the KL sum need more bits than bf16 has.
        self.mean, logvar = moments.float().chunk(2, dim=1)
        # Bounds keep exp() finite early in training (the LDM autoencoder uses the same range).
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over latent elements: shape [B]."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(StageModel):
    """encode(x in [-1, 1], [B, 3, H, W]) -> DiagonalGaussian over [B, 4, H/8, W/8]; decode(z) -> x in [-1, 1].

    ``decode`` is not clamped (clamping would stop gradients); clamp before display or metrics. Latents are
    unscaled here: the UNet stage maps them to its own and back (``diffusion.latents.LatentNormalisation``: by
    ``config.scaling_factor``, or per channel by ``config.latents_mean`` / ``latents_std``).
    """

    STAGE_KIND = "vae"
    CONFIG_CLASS = VAEConfig

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.channel_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def last_layer_weight(self) -> Tensor:
        """The decoder's output conv weight: where the GAN's adaptive weight compares gradient norms."""
        return self.decoder.conv_out.weight

    def encode(self, x: Tensor) -> DiagonalGaussian:
        self._check_images(x)
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"decode expects latents [B, {self.latent_channels}, h, w], got shape {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruct ``x`` through a posterior sample; returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior

    def _check_images(self, x: Tensor) -> None:
        f, c = self.downsample_factor, self.config.in_channels
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"encode expects images [B, {c}, H, W] in [-1, 1], got shape {tuple(x.shape)}; "
                             "convert grayscale/RGBA images to RGB first")
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image size {x.shape[-2]}x{x.shape[-1]} is not a multiple of the downsample factor "
                             f"{f}; resize or crop to a multiple of {f} (e.g. {x.shape[-2] // f * f})")

"""The text-conditional latent UNet (Stable-Diffusion-2 layout, from scratch).

``conv_in -> encoder levels (ResBlock + spatial transformer, x num_res_blocks, then stride-2 conv)
-> middle (ResBlock, transformer, ResBlock) -> decoder levels (skip concat, ResBlock + transformer,
x num_res_blocks + 1, then upsample) -> GroupNorm/SiLU -> zero-initialised conv_out``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.precision import GroupNorm
from engine.stage import StageModel
from unet.blocks import (Downsample, ResBlock, SpatialTransformer, TimestepMLP, Upsample, maybe_checkpoint,
                         zero_init)
from unet.config import UNetConfig


class ResTransformerLayer(nn.Module):
    """One UNet layer: a ResBlock (mixes in the timestep) followed by a spatial transformer (mixes in the text)."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, config: UNetConfig):
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, time_dim, config.norm_groups, config.dropout)
        self.transformer = SpatialTransformer(out_channels, config.context_dim, config.head_dim,
                                              config.transformer_depth, config.norm_groups, config.qk_norm)

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        return self.transformer(self.res(x, temb), context)


class Level(nn.Module):
    """The layers of one resolution level and the resampling that leaves it (``None`` at the end of the path)."""

    def __init__(self, layers: list[ResTransformerLayer], resample: nn.Module | None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.resample = resample


class MiddleBlock(nn.Module):
    """ResBlock -> spatial transformer -> ResBlock at the lowest resolution."""

    def __init__(self, channels: int, time_dim: int, config: UNetConfig):
        super().__init__()
        self.layer = ResTransformerLayer(channels, channels, time_dim, config)
        self.res = ResBlock(channels, channels, time_dim, config.norm_groups, config.dropout)

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        return self.res(self.layer(x, temb, context), temb)


class UNet(StageModel):
    """Predicts noise (or velocity) for latents ``x [B, C, H, W]`` at timesteps ``t`` given text states."""

    STAGE_KIND = "unet"
    CONFIG_CLASS = UNetConfig

    def __init__(self, config: UNetConfig):
        super().__init__()
        config.validate()
        if config.context_dim is None:
            raise ValueError("UNetConfig.context_dim is unset: set it to the text encoder's width "
                             "(diffusion.train takes it from the CLIP stage)")
        self.config = config
        widths = [config.base_channels * m for m in config.channel_mult]
        time_dim = 4 * config.base_channels
        self.time_embed = TimestepMLP(config.base_channels, time_dim)
        # Same shape as diffusers' "projection" class embedding, so the weights map one to one.
        self.augment_embed = (nn.Sequential(nn.Linear(config.augment_dim, time_dim), nn.SiLU(),
                                            nn.Linear(time_dim, time_dim)) if config.augment_dim else None)
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)

        # Encoder: remember the width of every tensor pushed onto the skip stack.
        skip_widths = [widths[0]]
        self.down = nn.ModuleList()
        channels = widths[0]
        for i, width in enumerate(widths):
            layers = []
            for _ in range(config.num_res_blocks):
                layers.append(ResTransformerLayer(channels, width, time_dim, config))
                channels = width
                skip_widths.append(channels)
            is_last = i == len(widths) - 1
            self.down.append(Level(layers, None if is_last else Downsample(channels)))
            if not is_last:
                skip_widths.append(channels)

        self.middle = MiddleBlock(channels, time_dim, config)

        # Decoder: one more layer per level than the encoder, each consuming one skip tensor.
        self.up = nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            layers = []
            for _ in range(config.num_res_blocks + 1):
                layers.append(ResTransformerLayer(channels + skip_widths.pop(), width, time_dim, config))
                channels = width
            self.up.append(Level(layers, Upsample(channels) if i > 0 else None))

        self.norm_out = GroupNorm(config.norm_groups, channels, eps=1e-6)
        self.conv_out = zero_init(nn.Conv2d(channels, config.out_channels, 3, padding=1))
        # Built last and ending in zeros, so a UNet with it starts as the same function, from the same initial
        # weights, as one without it: a run that adds it differs from the default by what it learns.
        self.context_embed = (nn.Sequential(nn.Linear(config.context_dim, time_dim), nn.SiLU(),
                                            zero_init(nn.Linear(time_dim, time_dim)))
                              if config.pooled_context else None)

    def _check_inputs(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet expects latents [B, {cfg.in_channels}, H, W], got shape {tuple(x.shape)}")
        factor = cfg.downsample_factor
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not divisible by {factor} "
                             f"(2**(len(channel_mult)-1) with channel_mult={cfg.channel_mult}); "
                             "use an image resolution whose latent size is a multiple of it")
        if context.ndim != 3 or context.shape[0] != x.shape[0]:
            raise ValueError(f"context must be [B={x.shape[0]}, L, {cfg.context_dim}], got {tuple(context.shape)}")
        if context.shape[-1] != cfg.context_dim:
            raise ValueError(f"context has width {context.shape[-1]} but the UNet was built with "
                             f"context_dim={cfg.context_dim}: the text encoder and the UNet must match "
                             "(train the UNet on this CLIP stage's text states)")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"timesteps must be a scalar or [B={x.shape[0]}], got shape {tuple(t.shape)}")
        return t

    def forward(self, x: Tensor, t: Tensor, context: Tensor, augment: Tensor | None = None) -> Tensor:
        """``augment [B, augment_dim]`` labels how each training input was augmented; ``None`` is the zero label
        (un-augmented data), which is what sampling asks for."""
        t = self._check_inputs(x, t, context)
        ckpt = self.config.gradient_checkpointing and self.training
        temb = self.time_embed(t)
        if self.augment_embed is not None:
            if augment is None:
                augment = x.new_zeros(x.shape[0], self.config.augment_dim)
            elif augment.shape != (x.shape[0], self.config.augment_dim):
                raise ValueError(f"augment must be [B={x.shape[0]}, {self.config.augment_dim}], "
                                 f"got {tuple(augment.shape)}")
            temb = temb + self.augment_embed(augment.to(temb.dtype))
        elif augment is not None:
            raise ValueError("this UNet was built with augment_dim=0 and takes no augmentation label")
        if self.context_embed is not None:
            temb = temb + self.context_embed(context.mean(dim=1))
        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for layer in level.layers:
                h = maybe_checkpoint(layer, h, temb, context, enabled=ckpt)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = maybe_checkpoint(self.middle, h, temb, context, enabled=ckpt)
        for level in self.up:
            for layer in level.layers:
                h = maybe_checkpoint(layer, torch.cat([h, skips.pop()], dim=1), temb, context, enabled=ckpt)
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))

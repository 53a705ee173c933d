"""diffusers models and a diffusers sampling loop built to match ours, so the benchmark compares like with like.

``diffusers`` is the optional ``bench`` extra (``pip install -e ".[bench]"``); nothing outside ``benchmarks/``
imports it.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import Tensor, nn

from diffusion.schedule import ScheduleConfig
from unet.config import UNetConfig
from vae.config import VAEConfig

EpsModel = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t, t [B], context) -> raw prediction

# our schedule kind -> diffusers' beta_schedule name (its "squaredcos_cap_v2" is the same s=0.008, 0.999-capped cosine)
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def diffusers_unet(config: UNetConfig, sample_size: int) -> UNet2DConditionModel:
    """diffusers' UNet with our layout: a cross-attention transformer at every level and in the middle,
    linear transformer projections, GroupNorm eps 1e-6, dropout in the ResNet blocks only (as ours)."""
    widths = tuple(config.base_channels * mult for mult in config.channel_mult)
    levels = len(widths)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        block_out_channels=widths,
        layers_per_block=config.num_res_blocks,
        # Historically misnamed: UNet2DConditionModel reads attention_head_dim as the number of heads per
        # level (SD 2 passes (5, 10, 20, 20) for widths (320, 640, 1280, 1280): 64-dim heads).
        attention_head_dim=tuple(width // config.head_dim for width in widths),
        transformer_layers_per_block=config.transformer_depth,
        cross_attention_dim=config.context_dim,
        use_linear_projection=True,
        norm_num_groups=config.norm_groups,
        norm_eps=1e-6,
        dropout=config.dropout,
        flip_sin_to_cos=True,  # cos half first, as unet.blocks.timestep_embedding
        freq_shift=0,
    )


def diffusers_vae(config: VAEConfig) -> AutoencoderKL:
    """diffusers' KL autoencoder with our layout (no 1x1 quant convs, which ours does not have)."""
    widths = tuple(config.base_channels * mult for mult in config.channel_mult)
    levels = len(widths)
    return AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.in_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=widths,
        layers_per_block=config.num_res_blocks,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_groups,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def diffusers_ddim_scheduler(config: ScheduleConfig, prediction_type: str) -> DDIMScheduler:
    """DDIM on our noise schedule: trailing timesteps, and the last step goes to alpha_bar = 1 as ours does."""
    return DDIMScheduler(
        num_train_timesteps=config.num_steps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule=_BETA_SCHEDULES[config.kind],
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type=prediction_type,
        timestep_spacing="trailing",
        rescale_betas_zero_snr=config.zero_terminal_snr,
    )


def diffusers_guided_ddim(eps_model: EpsModel, scheduler: DDIMScheduler, x: Tensor, cond: Tensor, uncond: Tensor,
                          guidance_scale: float, steps: int) -> Tensor:
    """The denoising loop of diffusers' StableDiffusionPipeline (guidance batch ``[uncond; cond]``) on its
    DDIMScheduler. Its timesteps stay on the CPU, so ``scheduler.step`` reads its CPU tables with no device
    sync; the model gets a device copy made once, before the loop."""
    scheduler.set_timesteps(steps)
    contexts = torch.cat([uncond.expand_as(cond), cond])
    timesteps_on_device = scheduler.timesteps.to(x.device)
    for i, t in enumerate(scheduler.timesteps):
        t_batch = timesteps_on_device[i].expand(2 * x.shape[0])
        pred_uncond, pred_cond = eps_model(torch.cat([x, x]), t_batch, contexts).chunk(2)
        pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
        x = scheduler.step(pred, t, x, return_dict=False)[0]
    return x

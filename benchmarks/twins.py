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
from pipelines.export import diffusers_scheduler_config, diffusers_unet_config, diffusers_vae_config
from unet.config import UNetConfig
from vae.config import VAEConfig

EpsModel = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t, t [B], context) -> raw prediction


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def diffusers_unet(config: UNetConfig, sample_size: int) -> UNet2DConditionModel:
    """diffusers' UNet with our layout: the one ``pipelines.export`` writes (see ``diffusers_unet_config``)."""
    return UNet2DConditionModel(**diffusers_unet_config(config, sample_size))


def diffusers_vae(config: VAEConfig) -> AutoencoderKL:
    """diffusers' KL autoencoder with our layout (no 1x1 quant convs, which ours does not have)."""
    return AutoencoderKL(**diffusers_vae_config(config, sample_size=512))


def diffusers_ddim_scheduler(config: ScheduleConfig, prediction_type: str) -> DDIMScheduler:
    """DDIM on our noise schedule: trailing timesteps, and the last step goes to alpha_bar = 1 as ours does."""
    return DDIMScheduler(**diffusers_scheduler_config(config, prediction_type))


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

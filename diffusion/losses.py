"""Training loss of the latent UNet: denoising MSE plus two optional terms on the model's x0 estimate.

``loss = mse + div_weight * diversity + cons_weight * ramp(step) * consistency``; every term is logged on its
own and a term whose weight is 0 is not computed at all. For a batch of clean latents ``x0``, timesteps
``t ~ U{0..T-1}``, noise ``eps`` and the noisy latents ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps``
(``ab_t`` = alpha_bar, the *cumulative* product of the schedule's alphas):

mse
    Per-sample mean squared error between the prediction and its target (``eps``, or
    ``v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0``), averaged over the batch. With ``min_snr_gamma > 0`` each
    sample is weighted by Min-SNR-gamma (Hang et al. 2023), which caps the x0-space weight of a step at
    ``gamma``: ``min(SNR_t, gamma) / SNR_t`` for epsilon and ``min(SNR_t, gamma) / (SNR_t + 1)`` for v. For v
    that leaves the pure-noise step of a zero-terminal-SNR schedule (SNR 0) with weight 0, and the steps near it
    with almost none, though sampling starts from that step's prediction; ``min_snr_plus_one`` caps the v-loss's
    own x0-space weight, ``SNR_t + 1``, instead: ``min(SNR_t + 1, gamma) / (SNR_t + 1)``, 1 (the plain v-loss)
    wherever ``SNR_t + 1 <= gamma`` (kohya-ss/sd-scripts#673, huggingface/diffusers#9451).
    ``offset_noise > 0`` adds ``offset_noise * N(0, 1)`` per (sample, channel), constant over the pixels, to
    ``eps`` (and so to the target), which lets the model change an image's overall brightness. The logged
    ``mse`` is this (weighted) term.

consistency
    Mean squared error between the model's clean-latent estimate and the clean latent,
    ``x0_hat = (x_t - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t)`` (or ``sqrt(ab_t) x_t - sqrt(1 - ab_t) v_hat``),
    recovered with the cumulative ``ab_t`` by ``NoiseSchedule.to_x0_eps``. Each sample is weighted by
    ``w_t = min(SNR_t, x0_snr_cap) / x0_snr_cap`` in [0, 1]. Since ``x0_hat - x0 = -(eps_hat - eps) /
    sqrt(SNR_t)``, the unweighted x0 error of a noisy step would be its epsilon error blown up by
    ``1 / SNR_t`` (x1000 near ``t = T``); weighted, a sample contributes
    ``|eps_hat - eps|^2 * min(SNR_t, cap) / (cap * SNR_t)``, never more than its epsilon MSE / ``cap``, while
    nearly clean steps, where ``x0_hat`` is a real picture, count fully. (So in expectation it is a
    reweighted denoising loss that favours low-noise steps; its value is in the x0 units it is logged in.)
    Its weight ramps linearly from 0 to ``cons_weight`` over ``cons_warmup_steps``.

diversity
    Collapse penalty on the same (gradient-carrying) ``x0_hat`` across the batch. For every pair ``i != j``
    of samples from *different* source images (a picture and its mirror count as one source), with ``cos``
    the cosine similarity of the flattened latents:
    ``excess_ij = relu(cos(x0_hat_i, x0_hat_j) - cos(x0_i, x0_j) - div_margin)``. The term is the mean over
    those pairs of ``min(w_i, w_j) * excess_ij``: predictions may be as similar as the clean latents are (plus
    a margin) without penalty, so it pushes apart only estimates that are more alike than their data, and
    the SNR weight keeps it off the high-noise steps, where the best estimate is legitimately a blurry
    average that looks like every other one. It is 0 when the estimates have the clean latents' similarity
    structure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.schedule import NoiseSchedule, check_prediction_type
from engine.config import ConfigError


@dataclass
class DiffusionLossConfig:
    """Weights and options of the loss terms (see the module docstring for the formulas)."""

    min_snr_gamma: float = 5.0  # 0: unweighted MSE
    min_snr_plus_one: bool = False  # v only: cap SNR + 1, not SNR, so the zero-terminal step keeps weight 1
    offset_noise: float = 0.0
    div_weight: float = 0.0  # 0: diversity term off
    div_margin: float = 0.05
    cons_weight: float = 0.0  # 0: consistency term off
    cons_warmup_steps: int = 500
    x0_snr_cap: float = 5.0  # SNR at which an x0-space term counts fully

    def validate(self) -> None:
        """Raise ``ConfigError`` for a weight, margin or count below 0 (a negative Min-SNR gamma read as 0, say)."""
        for name in ("min_snr_gamma", "offset_noise", "div_weight", "div_margin", "cons_weight", "cons_warmup_steps"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if not self.x0_snr_cap > 0:
            raise ConfigError(f"loss.x0_snr_cap must be > 0, got {self.x0_snr_cap}")


def min_snr_weight(snr: Tensor, gamma: float, prediction_type: str, plus_one: bool = False) -> Tensor:
    """Min-SNR-gamma loss weight per sample for an epsilon or v target (1 where SNR = 0 for epsilon; for v 0
    there, or 1 with ``plus_one``: the module docstring)."""
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    if plus_one:
        return (snr + 1).clamp(max=gamma) / (snr + 1)
    return clipped / (snr + 1)


def x0_weight(snr: Tensor, cap: float) -> Tensor:
    """``min(SNR, cap) / cap``: how much an x0-space error at this noise level counts, in [0, 1]."""
    return snr.clamp(max=cap) / cap


def consistency_loss(x0_hat: Tensor, x0: Tensor, weight: Tensor) -> Tensor:
    """Mean over the batch of ``weight_i * mean((x0_hat_i - x0_i)^2)``."""
    per_sample = (x0_hat.float() - x0.float()).pow(2).flatten(1).mean(1)
    return (weight * per_sample).mean()


def diversity_loss(x0_hat: Tensor, x0: Tensor, image_ids: Tensor, weight: Tensor, margin: float) -> Tensor:
    """Mean over pairs of different source images of ``min(w_i, w_j) * relu(cos_hat_ij - cos_ij - margin)``."""
    with torch.autocast(x0_hat.device.type, enabled=False):  # cosines in float32, also under bf16 autocast
        pred = F.normalize(x0_hat.float().flatten(1), dim=1)
        clean = F.normalize(x0.float().flatten(1), dim=1)
        excess = F.relu(pred @ pred.T - clean @ clean.T - margin)
    is_pair = image_ids[:, None] != image_ids[None, :]
    pair_weight = torch.minimum(weight[:, None], weight[None, :]) * is_pair
    return (pair_weight * excess).sum() / is_pair.sum().clamp(min=1)


class DiffusionTrainingModule(nn.Module):
    """The UNet plus its training loss, as one module for the engine (and DDP).

    ``forward(batch, step)`` takes ``batch = {"latents": [B, C, H, W] scaled clean latents, "context":
    [B, L, D] text states (caption dropout already applied), optionally "image_ids": [B] source image of each
    row, "augment": [B, A] augmentation labels, "generator": torch.Generator on the latents' device}`` and
    returns ``(loss, logs)``.
    """

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, prediction_type: str, config: DiffusionLossConfig):
        super().__init__()
        check_prediction_type(prediction_type)
        self.model = model
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.config = config

    def draw_noise(self, x0: Tensor, generator: torch.Generator | None) -> Tensor:
        """Standard normal noise like ``x0``, plus the per-channel offset noise when enabled."""
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.config.offset_noise > 0:
            offset = torch.randn(x0.shape[:2], generator=generator, device=x0.device, dtype=x0.dtype)
            noise = noise + self.config.offset_noise * offset[:, :, None, None]
        return noise

    def forward(self, batch: dict, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        x0 = batch["latents"]
        generator = batch.get("generator")
        t = torch.randint(0, self.schedule.num_steps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = self.draw_noise(x0, generator)
        return self.loss_terms(x0, noise, t, batch["context"], step, batch.get("image_ids"), batch.get("augment"))

    def cons_ramp(self, step: int) -> float:
        """Linear warm-up factor of the consistency weight."""
        warmup = self.config.cons_warmup_steps
        return 1.0 if warmup <= 0 else min(1.0, step / warmup)

    def loss_terms(self, x0: Tensor, noise: Tensor, t: Tensor, context: Tensor, step: int,
                   image_ids: Tensor | None = None, augment: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss at given timesteps and noise (``forward`` draws them; validation fixes them).
        ``augment`` is the batch's augmentation labels (``None``: un-augmented, and for a UNet without them)."""
        cfg = self.config
        x_t = self.schedule.add_noise(x0, noise, t)
        pred = (self.model(x_t, t, context) if augment is None else self.model(x_t, t, context, augment)).float()
        snr = self.schedule.snr(t)

        target = self.schedule.prediction_target(x0.float(), noise.float(), t, self.prediction_type)
        per_sample = (pred - target).pow(2).flatten(1).mean(1)
        if cfg.min_snr_gamma > 0:
            per_sample = per_sample * min_snr_weight(snr, cfg.min_snr_gamma, self.prediction_type,
                                                     cfg.min_snr_plus_one)
        mse = per_sample.mean()
        loss, logs = mse, {"mse": mse.detach()}
        if cfg.div_weight == 0 and cfg.cons_weight == 0:
            return loss, logs

        x0_hat, _ = self.schedule.to_x0_eps(pred, x_t.float(), t, self.prediction_type)
        weight = x0_weight(snr, cfg.x0_snr_cap)
        if cfg.cons_weight > 0:
            consistency = consistency_loss(x0_hat, x0, weight)
            loss = loss + cfg.cons_weight * self.cons_ramp(step) * consistency
            logs["consistency"] = consistency.detach()
        if cfg.div_weight > 0:
            if image_ids is None:
                image_ids = torch.arange(x0.shape[0], device=x0.device)
            diversity = diversity_loss(x0_hat, x0, image_ids, weight, cfg.div_margin)
            loss = loss + cfg.div_weight * diversity
            logs["diversity"] = diversity.detach()
        return loss, logs

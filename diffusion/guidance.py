"""Classifier-free guidance (Ho & Salimans 2022) and autoguidance (Karras et al. 2024) as a denoiser for the
samplers."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Sequence

import torch
from torch import Tensor

from diffusion.noise import NoiseSource, PerSampleNoise
from diffusion.samplers import SAMPLERS, Denoiser, StepCallback
from diffusion.schedule import NoiseSchedule, check_prediction_type

Model = Callable[[Tensor, Tensor, Tensor], Tensor]  # model(x_t, t, context) -> raw epsilon or v prediction
# Beside classifier-free guidance 4, 1.5 is the largest push that kept the layout (2 brought background scribbles
# back, 3 filled the frame: docs/results/studies/autoguidance/)
DEFAULT_AUTOGUIDANCE_SCALE = 1.5


def rescale_guided(guided: Tensor, cond: Tensor, rescale: float) -> Tensor:
    """Guidance rescale (Lin et al. 2024, eq. 15-16): blend the guided prediction with a copy whose per-sample
    standard deviation is the conditional prediction's, ``rescale * guided * std(cond) / std(guided) +
    (1 - rescale) * guided``. High guidance on a zero-terminal-SNR schedule otherwise over-saturates."""
    dims = tuple(range(1, guided.ndim))
    matched = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-8))
    return rescale * matched + (1 - rescale) * guided


def has_levels_above(interval: tuple[float, float] | None) -> bool:
    """Whether any noise level lies above ``interval``: only below a finite top (pure noise is sigma inf)."""
    return interval is not None and math.isfinite(interval[1])


def check_guidance_interval(interval: tuple[float, float] | None, scale_above: float = 1.0) -> None:
    """Raise ``ValueError`` unless ``interval`` is None or ``(sigma_lo, sigma_hi)`` with ``0 <= lo < hi``, and
    ``scale_above`` (the scale above the interval) is >= 0 and 1 unless the interval has a finite top."""
    if interval is not None and (len(interval) != 2 or not 0 <= interval[0] < interval[1]):
        raise ValueError(f"guidance interval must be (sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi "
                         f"(noise levels sigma = sqrt((1 - alpha_bar) / alpha_bar), inf allowed), got {interval}")
    if not 0 <= scale_above < math.inf:
        raise ValueError(f"the guidance scale above the interval must be a finite number >= 0 (1: the prompt's "
                         f"prediction alone), got {scale_above}")
    if scale_above != 1 and not has_levels_above(interval):
        raise ValueError(f"a guidance scale above the interval ({scale_above:g}) needs an interval with a finite top "
                         f"(sigma_hi), got {interval}: give one, or leave the scale above it at 1")


def guidance_scale_table(schedule: NoiseSchedule, guidance_scale: float,
                         interval: tuple[float, float] | None, scale_above: float = 1.0) -> Tensor:
    """The guidance scale at every timestep, float32 [T]: ``guidance_scale`` where the noise level
    ``sigma_t = sqrt((1 - ab_t) / ab_t)`` lies in ``(sigma_lo, sigma_hi]``, ``scale_above`` above ``sigma_hi``
    and 1 (the prompt's prediction alone) below ``sigma_lo``; ``interval=None`` guides everywhere. Kynkaanniemi
    et al. 2024: guidance at the highest noise levels pulls the seeds of one prompt onto one layout (less
    variety, more copies of a training image), and at the lowest it only sharpens what is already there; a
    ``scale_above`` between 1 and ``guidance_scale`` pushes the prompt (its colour, set at those levels) less
    hard there than inside."""
    check_guidance_interval(interval, scale_above)
    sigma = schedule.sigmas
    if interval is None:
        return torch.full_like(sigma, guidance_scale, dtype=torch.float32)
    inside = (sigma > interval[0]) & (sigma <= interval[1])
    return torch.where(inside, guidance_scale, torch.where(sigma > interval[1], scale_above, 1.0)).float()


def is_guided(guidance_scale: float, autoguidance_scale: float | None = None) -> bool:
    """Whether a step inside the guidance interval differs from the prompt's prediction alone: a classifier-free
    scale other than 1, or an autoguidance scale (None: no guide model) other than 1."""
    return guidance_scale != 1 or (autoguidance_scale is not None and autoguidance_scale != 1)


def step_guidance(schedule: NoiseSchedule, timesteps: Tensor, guidance_scale: float,
                  interval: tuple[float, float] | None, scale_above: float = 1.0,
                  autoguidance_scale: float | None = None) -> list[tuple[float, float]]:
    """The (classifier-free, autoguidance) scales each sampling step (``timesteps``, descending) takes, as
    ``cfg_denoiser`` reads them (``autoguidance_scale`` None: no guide model, 1). Steps with equal pairs run the
    same guided denoiser, so settings whose bounds select the same steps draw the same samples: a bound between two
    of the steps' noise levels moves nothing."""
    index = timesteps.cpu().long()
    scales = guidance_scale_table(schedule, guidance_scale, interval, scale_above)[index].tolist()
    auto_scales = [1.0] * len(scales) if autoguidance_scale is None else \
        guidance_scale_table(schedule, autoguidance_scale, interval)[index].tolist()
    return list(zip(scales, auto_scales))


def guidance_edges(guidance: Sequence[tuple[float, float]], timesteps: Tensor) -> list[int]:
    """The sampling timesteps (descending) at which a step's guidance (``step_guidance``) differs from the step
    before's: where the interval begins or ends, or where the scale above it gives way to the interval's. The guided
    denoiser there is another function than at the step before, so a multistep solver should not extrapolate across
    it (the samplers' ``first_order_at``). DPM-Solver++(2M) would otherwise push the first guided step towards the
    prompt by ``1 + (1 + w)(scale - 1)`` rather than ``scale``, ``w`` its extrapolation weight."""
    steps = timesteps.tolist()
    return [t for t, before, now in zip(steps[1:], guidance, guidance[1:]) if before != now]


def check_condition_noise(condition_noise: tuple[float, float, float] | None) -> None:
    """Raise ``ValueError`` unless ``condition_noise`` is None or ``(scale, sigma_lo, sigma_hi)`` with
    ``0 < scale < inf`` and ``0 < sigma_lo < sigma_hi < inf``."""
    if condition_noise is None:
        return
    if len(condition_noise) != 3 or not (0 < condition_noise[0] < math.inf
                                         and 0 < condition_noise[1] < condition_noise[2] < math.inf):
        raise ValueError(f"condition noise must be (scale, sigma_lo, sigma_hi) with 0 < scale < inf and 0 < sigma_lo < "
                         f"sigma_hi < inf (the prompt is whole below sigma_lo, pure noise above sigma_hi), "
                         f"got {condition_noise}")


def condition_noise_table(schedule: NoiseSchedule, sigma_lo: float, sigma_hi: float) -> Tensor:
    """How much of the prompt the condition keeps at every timestep, float64 [T]: 1 at noise levels
    ``sigma <= sigma_lo``, 0 at ``sigma >= sigma_hi`` (the zero-terminal-SNR level, inf, too), linear in
    log sigma between (the annealing of Sadat et al. 2024, CADS, given in noise levels like the guidance
    interval; the paper ramps linearly in t)."""
    log_sigma = schedule.sigmas.double().log()
    return ((math.log(sigma_hi) - log_sigma) / (math.log(sigma_hi) - math.log(sigma_lo))).clamp(0, 1)


def anneal_condition(cond: Tensor, keep: float, scale: float, noise: Tensor) -> Tensor:
    """CADS's noised condition: ``sqrt(keep) * cond + scale * sqrt(1 - keep) * noise``, shifted and scaled back
    to each sample's own mean and standard deviation of ``cond`` (the paper's rescale, psi = 1), so the network
    sees text states of the usual size at every level, however little of the prompt is left in them."""
    dims = tuple(range(1, cond.ndim))
    noised = keep ** 0.5 * cond + scale * (1 - keep) ** 0.5 * noise
    standardised = (noised - noised.mean(dim=dims, keepdim=True)) / noised.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return standardised * cond.std(dim=dims, keepdim=True) + cond.mean(dim=dims, keepdim=True)


# How far (in the row's largest state) a prompt's text states may lie from the unconditional ones and still be the
# unconditional text: batch composition moved no state on the CPU (fp32 or bf16) and may move CUDA's bf16 ones by
# a few ulps (under 1 %); a distinct prompt moved them 24 % and more (tiny run's CLIP; random default-size: 58 %)
UNCONDITIONAL_RTOL = 0.05


def unconditional_rows(cond: Tensor, uncond: Tensor, rtol: float = UNCONDITIONAL_RTOL) -> list[bool]:
    """Which rows of ``cond`` [B, L, D] are the unconditional text ``uncond`` ([1 or B, L, D]): the empty prompt
    (or the negative prompt itself) encoded beside real prompts. The rule is on the states, so a blank prompt
    (the tokenizer strips it to the empty one) and every caller's batch are covered, within ``rtol`` of the
    row's largest unconditional state since a batched encoder need not give bitwise the same states."""
    uncond = uncond.expand_as(cond)
    dims = tuple(range(1, cond.ndim))
    gap = (cond.float() - uncond.float()).abs().amax(dim=dims)
    return (gap <= rtol * uncond.float().abs().amax(dim=dims)).tolist()


def row_noise(noise: NoiseSource, rows: Sequence[int], batch: int, device: torch.device | str) -> NoiseSource:
    """A noise source for batches of ``batch`` that draws ``noise`` in ``rows`` and gives zeros elsewhere. Of a
    ``PerSampleNoise`` only the generators of ``rows`` advance, so a row left out keeps the stream it has without
    the draw (its later step noise unchanged); any other source is one stream for the batch and draws it whole."""
    if len(rows) == batch:
        return noise
    index = torch.tensor(list(rows), dtype=torch.long, device=device)  # built once: a copy per draw would sync
    part = noise.rows(rows) if isinstance(noise, PerSampleNoise) else None

    def draw(like: Tensor) -> Tensor:
        fresh = torch.zeros_like(like)
        if len(rows):
            fresh[index] = noise(like)[index] if part is None else part(like[index])
        return fresh

    return draw


def cfg_denoiser(model: Model, schedule: NoiseSchedule, prediction_type: str, cond: Tensor, uncond: Tensor,
                 guidance_scale: float, guidance_rescale: float = 0.0,
                 guidance_interval: tuple[float, float] | None = None,
                 condition_noise: tuple[float, float, float] | None = None,
                 noise: NoiseSource | None = None, guide_model: Model | None = None,
                 autoguidance_scale: float = DEFAULT_AUTOGUIDANCE_SCALE,
                 guidance_scale_above: float = 1.0) -> Denoiser:
    """Denoiser returning x0 from the guided prediction ``uncond + scale * (cond - uncond)`` (rescaled by
    :func:`rescale_guided` when ``guidance_rescale > 0``). With ``guidance_interval`` the scale is
    ``guidance_scale`` only at noise levels inside it, ``guidance_scale_above`` above it and 1 below it
    (:func:`guidance_scale_table`).

    ``guide_model`` adds autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of
    itself"): a second push, ``(autoguidance_scale - 1) * (cond - guide)``, away from ``guide_model`` on the same
    prompt, a weaker model of the same data, in the same levels. It pushes away from the weaker model's errors
    rather than from the unconditional image, so it sharpens without pulling every seed towards the prompt's
    prototype; the push towards the prompt stays classifier-free guidance's. ``guidance_scale=1`` is autoguidance
    alone, ``guide + autoguidance_scale * (cond - guide)``; a step with both runs the batched pass and the guide.

    ``cond``/``uncond`` are text states [B, L, D]; ``uncond`` (empty or negative prompt) may have batch 1 and is
    then shared by every sample. The two branches run as one forward on the batch ``[uncond; cond]``; at scale 1
    the guided prediction is the conditional one, so a step whose level the table leaves at 1 (outside the
    interval, or every step at ``guidance_scale=1``) runs the conditional batch alone. The table is read on the
    host at the sampler's host timestep, so the choice costs no sync.

    ``condition_noise = (scale, sigma_lo, sigma_hi)`` anneals the prompt (CADS, Sadat et al. 2024): at a step
    above ``sigma_lo`` the conditional branch sees :func:`anneal_condition` of ``cond`` with fresh ``noise`` (drawn
    like ``cond``, so per-sample streams stay per sample), keeping the share :func:`condition_noise_table` gives;
    ``uncond`` stays as it is. The high levels, where guidance pulls one prompt's seeds onto one layout, then
    see a blurred prompt (the paper's aim: variety under strong guidance; what it does to copies of training
    images here is for the sampling sweep to say). A row whose ``cond`` is the unconditional text
    (:func:`unconditional_rows`: an empty prompt) has no prompt to blur and is never annealed, draws no condition
    noise (its stream stays that of no annealing) and takes the unconditional prediction at every guided step,
    so guidance has no noise to amplify: it samples as at ``guidance_scale=1`` without condition noise.
    The noise is fresh at every step, so a multistep sampler that extrapolates from the last step's prediction
    (DPM++ 2M: ``(1 + w) D_i - w D_{i-1}``) passes on ``(1 + w)^2 + w^2`` times one step's share of its variance
    (2.5x at ``w`` = 0.5); the default scale was chosen on that sampler, so it includes this.
    """
    check_prediction_type(prediction_type)
    check_condition_noise(condition_noise)
    if condition_noise is not None and noise is None:
        raise ValueError("condition noise needs a noise source: pass noise= (e.g. the sampler's PerSampleNoise)")
    if uncond.shape[1:] != cond.shape[1:] or uncond.shape[0] not in (1, cond.shape[0]):
        raise ValueError(f"uncond has shape {tuple(uncond.shape)} but cond has {tuple(cond.shape)}; encode both "
                         "prompts to the same length and give uncond batch 1 or the batch of cond")
    scales, auto_scales = zip(*step_guidance(schedule, torch.arange(schedule.num_steps), guidance_scale,
                                             guidance_interval, guidance_scale_above,
                                             None if guide_model is None else autoguidance_scale))
    keeps = [1.0] * len(scales) if condition_noise is None else \
        condition_noise_table(schedule, *condition_noise[1:]).tolist()
    # [uncond; cond] is built once here, not per step (only an annealed step builds its own)
    uncond = uncond.expand_as(cond)
    both_contexts = torch.cat([uncond, cond]) if any(s != 1 for s in scales) else None
    # Rows of the unconditional text, read once on the host; a batch without any runs exactly as before
    plain = unconditional_rows(cond, uncond) if condition_noise is not None else [False] * cond.shape[0]
    annealed_rows = [i for i, is_plain in enumerate(plain) if not is_plain]
    plain_mask = torch.tensor(plain, device=cond.device) if any(plain) else None
    condition_draw = None if condition_noise is None else row_noise(noise, annealed_rows, len(plain), cond.device)

    def denoise(x_t: Tensor, t: int) -> Tensor:
        if x_t.shape[0] != cond.shape[0]:
            raise ValueError(f"x_t has batch {x_t.shape[0]} but cond has batch {cond.shape[0]}; "
                             "encode one prompt per sample")
        scale, auto_scale, keep = scales[t], auto_scales[t], keeps[t]
        t_batch = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        context, contexts = cond, both_contexts
        if keep < 1 and annealed_rows:
            context = anneal_condition(cond, keep, condition_noise[0], condition_draw(cond))
            if plain_mask is not None:  # the unconditional text stays as it is
                context = torch.where(plain_mask.view(-1, *[1] * (cond.ndim - 1)), cond, context)
            contexts = None if scale == 1 else torch.cat([uncond, context])
        if scale == 1:
            pred = pred_cond = model(x_t, t_batch, context)
        else:  # extrapolate from the empty prompt's prediction
            pred_uncond, pred_cond = model(torch.cat([x_t, x_t]), t_batch.repeat(2), contexts).chunk(2)
            if plain_mask is not None:  # the same text on both branches: nothing to extrapolate, exactly
                pred_cond = torch.where(plain_mask.view(-1, *[1] * (x_t.ndim - 1)), pred_uncond, pred_cond)
            pred = pred_uncond + scale * (pred_cond - pred_uncond)
        if auto_scale != 1:  # and from the weaker model's, on the same prompt
            pred = pred + (auto_scale - 1) * (pred_cond - guide_model(x_t, t_batch, context))
        if guidance_rescale > 0 and (scale != 1 or auto_scale != 1):
            pred = rescale_guided(pred, pred_cond, guidance_rescale)
        x0, _ = schedule.to_x0_eps(pred, x_t, t_batch, prediction_type)
        return x0

    return denoise


@torch.no_grad()
def guided_sample_and_decode(model: Model, decode: Callable[[Tensor], Tensor], schedule: NoiseSchedule,
                             prediction_type: str,
                             cond: Tensor, uncond: Tensor, guidance_scale: float, x: Tensor, timesteps: Tensor,
                             sampler: str, noise: PerSampleNoise, eta: float = 0.0,
                             eta_sigma_max: float | None = None, decode_batch: int | None = None,
                             decode_context: AbstractContextManager | None = None,
                             guidance_rescale: float = 0.0,
                             guidance_interval: tuple[float, float] | None = None,
                             condition_noise: tuple[float, float, float] | None = None,
                             guide_model: Model | None = None,
                             autoguidance_scale: float = DEFAULT_AUTOGUIDANCE_SCALE,
                             first_order_at_guidance_edges: bool = False,
                             guidance_scale_above: float = 1.0,
                             callback: StepCallback | None = None) -> tuple[Tensor, Tensor]:
    """Sample ``x`` (the UNet's noisy latents at ``timesteps[0]``) with guidance, then ``decode`` them to images
    (the VAE's decoder after ``LatentNormalisation.denormalise``).

    The one sampling path of ``pipelines.generate`` and the UNet stage's per-epoch grid. Returns the float32
    images (not clamped) and the UNet's latents. ``decode_batch`` bounds the VAE batch; ``decode_context``
    (e.g. an autocast) wraps the decoding only. ``noise`` also draws the condition noise, and ``guide_model`` is
    autoguidance's weaker model, at ``autoguidance_scale``, and ``guidance_scale_above`` the scale above the
    interval (all: ``cfg_denoiser``). ``first_order_at_guidance_edges`` steps first order where the guidance
    changes (:func:`guidance_edges`), in every row (an empty prompt's row too, whose denoiser does not change there).
    ``callback`` is the sampler's (step index, x after the step, the step's guided x0_hat).
    """
    denoiser = cfg_denoiser(model, schedule, prediction_type, cond, uncond, guidance_scale, guidance_rescale,
                            guidance_interval, condition_noise, noise, guide_model, autoguidance_scale,
                            guidance_scale_above)
    edges = guidance_edges(step_guidance(schedule, timesteps, guidance_scale, guidance_interval, guidance_scale_above,
                                         None if guide_model is None else autoguidance_scale),
                           timesteps) if first_order_at_guidance_edges else []
    latents = SAMPLERS[sampler](denoiser, schedule, x, timesteps, noise=noise, eta=eta, eta_sigma_max=eta_sigma_max,
                                first_order_at=frozenset(edges), callback=callback)
    with decode_context or nullcontext():
        images = torch.cat([decode(z).float() for z in latents.split(decode_batch or len(latents))])
    return images, latents

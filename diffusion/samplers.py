"""Samplers as plain functions of a denoiser (k-diffusion style), in discrete-timestep VP form.

A denoiser maps ``(x_t [B, ...], t) -> x0_hat``, ``t`` the step's timestep as a Python int: every sampler steps
the whole batch together, and a host int lets a denoiser decide per step without reading the device (the
guidance interval's skipped unconditional pass); it builds the timestep tensor its model takes. ``x`` passed to a
sampler is the noisy latent at level ``timesteps[0]``; each step moves to the next timestep and the last step
moves to the clean level (alpha_bar = 1), so the result is the final x0 estimate.

All step coefficients are computed up front on the CPU in float64 from the schedule table and kept as
Python floats, so the loop makes no host syncs; ``timesteps`` is read to the host once, before it.

Every sampler has one signature, ``sampler(denoiser, schedule, x, timesteps, *, noise=None, eta=0.0,
eta_sigma_max=None, first_order_at=(), callback=None)``: ``noise`` is where a stochastic step draws from
(``diffusion.noise``; ``PerSampleNoise`` makes each sample depend on its own seed only; ``None``: the global RNG),
``eta`` is the step noise of ``ddim`` and ``dpmpp_2m`` (0: deterministic, 1: as much as ancestral DDPM; in between
the two differ, ``ddim`` scaling the step noise's std, ``dpmpp_2m`` the exponent of ``exp(-h)`` in its SDE step)
and must stay 0 for ``ddpm``;
``eta_sigma_max`` limits that noise to the steps that start at a noise level sigma <= it (EDM's S_tmax; None:
every step); ``first_order_at`` names the timesteps at which the denoiser itself changes (a guidance interval's
edges): a multistep sampler takes a first-order step there instead of extrapolating from the other denoiser's
prediction (the one-step samplers are first order everywhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Collection

import torch
from torch import Tensor

from diffusion.noise import NoiseSource, generator_noise
from diffusion.schedule import NoiseSchedule

Denoiser = Callable[[Tensor, int], Tensor]
StepCallback = Callable[[int, Tensor, Tensor], None]  # (step index, x after the step, x0_hat of the step)


@dataclass(frozen=True)
class _Step:
    """``x_next = x_coef * x + x0_coef * x0_hat + noise_std * z`` for one step."""

    x_coef: float
    x0_coef: float
    noise_std: float

    def apply(self, x: Tensor, x0_hat: Tensor, noise: NoiseSource) -> Tensor:
        x_next = self.x_coef * x + self.x0_coef * x0_hat
        return x_next + self.noise_std * noise(x) if self.noise_std > 0 else x_next


def _levels(schedule: NoiseSchedule, timesteps: Tensor) -> tuple[list[int], list[float]]:
    """The timesteps as host ints, and alpha_bar at each followed by 1.0 (the clean level every sampler ends at)."""
    if timesteps.ndim != 1 or timesteps.dtype not in (torch.int64, torch.int32) or len(timesteps) == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D integer tensor, got dtype={timesteps.dtype} "
                         f"shape={tuple(timesteps.shape)}; use schedule.sampling_timesteps(steps)")
    steps = timesteps.cpu().long()
    if steps.min() < 0 or steps.max() >= schedule.num_steps:
        raise ValueError(f"timesteps must lie in [0, {schedule.num_steps - 1}], got {steps.tolist()}")
    if len(steps) > 1 and not bool((steps[1:] < steps[:-1]).all()):
        raise ValueError(f"timesteps must be strictly descending, got {steps.tolist()}")
    return steps.tolist(), schedule.alphas_cumprod[steps].tolist() + [1.0]


def _ddim_step(ab_from: float, ab_to: float, eta: float) -> _Step:
    """DDIM (Song et al. 2021, eq. 12) from level ab_from to ab_to, written in terms of (x, x0_hat).

    eps_hat = (x - sqrt(ab_from) x0_hat) / sqrt(1 - ab_from); x_to = sqrt(ab_to) x0_hat + c eps_hat + std z
    with std = eta * sqrt((1 - ab_to) / (1 - ab_from) * (1 - ab_from / ab_to)) and c = sqrt(1 - ab_to - std^2).
    """
    std = eta * math.sqrt((1 - ab_to) / (1 - ab_from) * (1 - ab_from / ab_to)) if ab_to > ab_from else 0.0
    eps_coef = math.sqrt(max(1 - ab_to - std ** 2, 0.0))  # rounding can make it -1e-17 at eta = 1
    x_coef = eps_coef / math.sqrt(1 - ab_from)
    return _Step(x_coef=x_coef, x0_coef=math.sqrt(ab_to) - x_coef * math.sqrt(ab_from), noise_std=std)


def _posterior_step(ab_t: float, ab_s: float) -> _Step:
    """Ancestral step: mean and std of the posterior q(x_s | x_t, x0 = x0_hat) for levels t -> s (s less noisy)."""
    alpha_ts = ab_t / ab_s
    beta_ts = 1 - alpha_ts
    return _Step(x_coef=math.sqrt(alpha_ts) * (1 - ab_s) / (1 - ab_t),
                 x0_coef=math.sqrt(ab_s) * beta_ts / (1 - ab_t),
                 noise_std=math.sqrt(beta_ts * (1 - ab_s) / (1 - ab_t)))


def _run_steps(denoiser: Denoiser, x: Tensor, timesteps: list[int], steps: list[_Step],
               noise: NoiseSource | None, callback: StepCallback | None) -> Tensor:
    noise = noise or generator_noise()
    for i, (t, step) in enumerate(zip(timesteps, steps)):
        x0_hat = denoiser(x, t).to(x.dtype)
        x = step.apply(x, x0_hat, noise)
        if callback is not None:
            callback(i, x, x0_hat)
    return x


def sample_ddim(denoiser: Denoiser, schedule: NoiseSchedule, x: Tensor, timesteps: Tensor, *,
                noise: NoiseSource | None = None, eta: float = 0.0, eta_sigma_max: float | None = None,
                first_order_at: Collection[int] = (), callback: StepCallback | None = None) -> Tensor:
    """DDIM; ``eta=0`` is the deterministic probability-flow sampler, ``eta=1`` matches ancestral DDPM."""
    check_eta("ddim", eta, eta_sigma_max)
    ts, levels = _levels(schedule, timesteps)
    steps = [_ddim_step(a, b, step_eta) for a, b, step_eta in zip(levels[:-1], levels[1:],
                                                                   step_etas(schedule, ts, eta, eta_sigma_max))]
    return _run_steps(denoiser, x, ts, steps, noise, callback)


def sample_ddpm(denoiser: Denoiser, schedule: NoiseSchedule, x: Tensor, timesteps: Tensor, *,
                noise: NoiseSource | None = None, eta: float = 0.0, eta_sigma_max: float | None = None,
                first_order_at: Collection[int] = (), callback: StepCallback | None = None) -> Tensor:
    """Ancestral sampling from the posterior q(x_{t'} | x_t, x0_hat) between consecutive timesteps."""
    check_eta("ddpm", eta, eta_sigma_max)
    ts, levels = _levels(schedule, timesteps)
    steps = [_posterior_step(a, b) for a, b in zip(levels[:-1], levels[1:])]
    return _run_steps(denoiser, x, ts, steps, noise, callback)


def check_eta(sampler: str, eta: float, eta_sigma_max: float | None = None) -> None:
    """Raise ``ValueError`` unless ``eta`` suits ``sampler``: in [0, 1] for ddim and dpmpp_2m, 0 for ddpm (ancestral
    already); and unless ``eta_sigma_max`` is None or a positive noise level given with some eta to limit."""
    if sampler == "ddpm" and (eta != 0 or eta_sigma_max is not None):
        given = f"eta={eta}" if eta != 0 else f"eta_sigma_max={eta_sigma_max}"
        raise ValueError(f"{given} applies to the ddim and dpmpp_2m samplers only; leave it unset for ddpm "
                         "(ancestral at every step already)")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1] (0: deterministic, 1: as much noise as ancestral ddpm), got {eta}")
    if eta_sigma_max is not None:
        if not eta_sigma_max > 0:
            raise ValueError(f"eta_sigma_max must be a noise level sigma > 0, got {eta_sigma_max}")
        if eta == 0:
            raise ValueError(f"eta_sigma_max={eta_sigma_max} limits the step noise, but eta is 0 (no step noise); "
                             "give eta > 0 with it, or leave it unset")


def step_etas(schedule: NoiseSchedule, timesteps: list[int], eta: float, eta_sigma_max: float | None) -> list[float]:
    """``eta`` at each step that starts at a noise level sigma <= ``eta_sigma_max``, 0 before (EDM's S_tmax): the
    deterministic high-noise steps set the layout, the stochastic low-noise ones can still repair details."""
    limit = math.inf if eta_sigma_max is None else eta_sigma_max
    return [eta if sigma <= limit else 0.0 for sigma in schedule.sigmas[timesteps].tolist()]


def _dpmpp_sde_step(ab_from: float, ab_to: float, eta: float) -> _Step:
    """First-order DPM-Solver++ SDE step (Lu et al. 2022, the SDE form; k-diffusion's 2M SDE with its ``eta``):
    with r = exp(-h) = (alpha_from sigma_to) / (sigma_from alpha_to),
    ``x_to = (sigma_to / sigma_from) r^eta x + alpha_to (1 - r^(1 + eta)) x0_hat + sigma_to sqrt(1 - r^(2 eta)) z``.
    eta = 0 is the DDIM step; eta = 1 is the DDPM posterior step. r is 0 to the clean level and from pure noise,
    so on a zero-terminal-SNR schedule the first step is ancestral at any eta > 0 (the start noise is replaced).
    """
    alpha_from, sigma_from = math.sqrt(ab_from), math.sqrt(1 - ab_from)
    alpha_to, sigma_to = math.sqrt(ab_to), math.sqrt(1 - ab_to)
    r = alpha_from * sigma_to / (sigma_from * alpha_to)
    return _Step(x_coef=sigma_to / sigma_from * r ** eta, x0_coef=alpha_to * (1 - r ** (1 + eta)),
                 noise_std=sigma_to * math.sqrt(max(1 - r ** (2 * eta), 0.0)))


def _half_log_snr(alpha_bar: float) -> float:
    """lambda = log(alpha / sigma), +-inf at the clean and pure-noise ends."""
    if alpha_bar <= 0:
        return -math.inf
    if alpha_bar >= 1:
        return math.inf
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


def sample_dpmpp_2m(denoiser: Denoiser, schedule: NoiseSchedule, x: Tensor, timesteps: Tensor, *,
                    noise: NoiseSource | None = None, eta: float = 0.0, eta_sigma_max: float | None = None,
                    first_order_at: Collection[int] = (), callback: StepCallback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep in lambda = log(alpha / sigma).

    Each step is the first-order update with x0_hat replaced by the extrapolation
    ``(1 + w) x0_hat_i - w x0_hat_{i-1}``, ``w = h_i / (2 h_{i-1})``. The first step, the last step (to the
    clean level, h = inf), a step after a pure-noise start (h_{i-1} = inf) and a step at a timestep in
    ``first_order_at`` (where the denoiser changes, so x0_hat_{i-1} is another function's) stay first order (w = 0).
    ``eta = 0`` (default) is the deterministic ODE solver and never draws from ``noise``; ``eta`` in (0, 1]
    is its SDE form (:func:`_dpmpp_sde_step`; eta = 1 is diffusers' ``sde-dpmsolver++``), which injects fresh
    noise at every step as ancestral sampling does, less of it at smaller eta.
    """
    check_eta("dpmpp_2m", eta, eta_sigma_max)
    ts, levels = _levels(schedule, timesteps)
    lambdas = [_half_log_snr(a) for a in levels]
    h = [b - a for a, b in zip(lambdas[:-1], lambdas[1:])]
    weights = [0.0] + [h[i] / (2 * h[i - 1]) if math.isfinite(h[i]) and math.isfinite(h[i - 1])
                       and ts[i] not in first_order_at else 0.0 for i in range(1, len(h))]
    steps = [_dpmpp_sde_step(a, b, step_eta) for a, b, step_eta in zip(levels[:-1], levels[1:],
                                                                        step_etas(schedule, ts, eta, eta_sigma_max))]

    noise = noise or generator_noise()
    previous_x0: Tensor | None = None
    for i, (t, step, w) in enumerate(zip(ts, steps, weights)):
        x0_hat = denoiser(x, t).to(x.dtype)
        x0_used = x0_hat if w == 0.0 or previous_x0 is None else (1 + w) * x0_hat - w * previous_x0
        x = step.apply(x, x0_used, noise)
        previous_x0 = x0_hat
        if callback is not None:
            callback(i, x, x0_hat)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddim": sample_ddim, "ddpm": sample_ddpm, "dpmpp_2m": sample_dpmpp_2m}


def ddim_invert(denoiser: Denoiser, schedule: NoiseSchedule, x0: Tensor, timesteps: Tensor) -> Tensor:
    """Run deterministic DDIM backwards: the x at ``timesteps[0]`` that ``sample_ddim(eta=0)`` maps to ``x0``.

    ``timesteps`` is the same descending sequence given to :func:`sample_ddim`. Each DDIM step is an affine map
    ``x_{i+1} = a x_i + b D(x_i, t_i)`` and is undone exactly, except that the denoiser sees the known, less noisy
    ``x_{i+1}`` in place of the unknown ``x_i`` (still with the forward step's ``t_i``). That error is first
    order in the step size, as is standing the clean input in for the latent at ``timesteps[-1]``, so the
    round trip is close when the steps are small.
    """
    ts, levels = _levels(schedule, timesteps)
    x = x0
    for i in range(len(ts) - 1, 0, -1):
        step = _ddim_step(levels[i], levels[i - 1], eta=0.0)
        x0_hat = denoiser(x, ts[i - 1]).to(x.dtype)
        x = step.x_coef * x + step.x0_coef * x0_hat
    return x

"""Discrete variance-preserving noise schedules.

A schedule is the table ``alpha_bar[t]`` (``alphas_cumprod``) for ``t = 0 .. T-1``; the noisy sample at step
``t`` is ``x_t = sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) eps``. Everything the losses and samplers need
(noising, SNR, the v target, turning a network prediction back into ``(x0, eps)``, the sampling timesteps)
is derived from that one table.

Tables are built once in float64 on the CPU. Per-call lookups gather the values for a batch of timesteps on
the device of the data, in float32 (float64 when the data is float64), from a per-device copy made once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine.config import UNRECORDED, ConfigError

SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# How sampling spreads its steps over the levels (NoiseSchedule.sampling_timesteps)
TIMESTEP_SPACINGS = ("trailing", "karras")
KARRAS_RHO = 7.0  # Karras et al. 2022's rho: sigma^(1 / rho) evenly spaced

_COSINE_OFFSET = 0.008  # ``s`` of Nichol & Dhariwal: keeps beta_0 from being vanishingly small
_COSINE_MAX_BETA = 0.999  # their clip, so the last step does not divide by alpha_bar = 0


@dataclass
class ScheduleConfig:
    """Which noise schedule to use; ``beta_start``/``beta_end`` are ignored by ``cosine``.

    ``zero_terminal_snr`` rescales the schedule so the last step is pure noise (Lin et al. 2024, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed"); pair it with ``v_prediction``, because an
    epsilon prediction says nothing about x0 when alpha_bar = 0.

    ``snr_shift`` divides the SNR of every step by this factor (after the rescale; a zero-SNR end stays zero).
    Averaging 2x2 pixels of an image halves the noise's standard deviation, so at twice the resolution a
    step leaves the picture's layout four times as visible: a shift of 4 gives a 512-px image at every step the
    layout SNR a 256-px image has unshifted (Hoogeboom et al. 2023, "simple diffusion"; SD3's resolution shift).
    """

    kind: str = "scaled_linear"
    num_steps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = False
    snr_shift: float = field(default=1.0, metadata={UNRECORDED: 1.0})  # older stages: unshifted

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field and the fix."""
        try:
            _check_config(self)
        except ValueError as err:
            raise ConfigError(f"schedule: {err}") from None


def _betas(config: ScheduleConfig) -> Tensor:
    steps = config.num_steps
    if config.kind == "linear":
        return torch.linspace(config.beta_start, config.beta_end, steps, dtype=torch.float64)
    if config.kind == "scaled_linear":
        return torch.linspace(math.sqrt(config.beta_start), math.sqrt(config.beta_end), steps,
                              dtype=torch.float64) ** 2
    # cosine: alpha_bar(u) = f(u) / f(0) with f(u) = cos((u + s) / (1 + s) * pi / 2)^2, u = step / T
    u = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((u + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=_COSINE_MAX_BETA)


def _rescale_to_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Shift sqrt(alpha_bar) so the last value is 0, then scale it so the first value is unchanged."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    return root ** 2


def _check_config(config: ScheduleConfig) -> None:
    if config.kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown noise schedule kind {config.kind!r}; choose one of {SCHEDULE_KINDS}")
    if not isinstance(config.num_steps, int) or config.num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got {config.num_steps!r}")
    if config.kind != "cosine" and not 0 < config.beta_start <= config.beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={config.beta_start}, "
                         f"beta_end={config.beta_end}")
    if not 0 < config.snr_shift < math.inf:
        raise ValueError(f"snr_shift must be a positive number (1: no shift, 4: the SNR a quarter), got "
                         f"{config.snr_shift}")


def check_prediction_type(prediction_type: str) -> None:
    """Raise a ValueError naming the choices when ``prediction_type`` is not one of them."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")


class NoiseSchedule:
    """The alpha_bar table of a :class:`ScheduleConfig` and the formulas built on it."""

    def __init__(self, config: ScheduleConfig) -> None:
        _check_config(config)
        self.config = config
        self.num_steps = config.num_steps
        betas = _betas(config)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        if config.zero_terminal_snr:
            alphas_cumprod = _rescale_to_zero_terminal_snr(alphas_cumprod)
        if config.snr_shift != 1:  # SNR / s: ab / (ab + s (1 - ab))
            alphas_cumprod = alphas_cumprod / (alphas_cumprod + config.snr_shift * (1 - alphas_cumprod))
        if config.zero_terminal_snr or config.snr_shift != 1:
            previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
            betas = 1 - alphas_cumprod / previous
        self.betas: Tensor = betas
        self.alphas_cumprod: Tensor = alphas_cumprod
        # the noise level sigma_t = sqrt((1 - ab_t) / ab_t) (inf at a zero-terminal-SNR end): the unit in which the
        # guidance interval, the step-noise window and the condition noise are given
        self.sigmas: Tensor = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        # float64 CPU tables gathered per call; copies per (device, dtype) are made on first use
        self._tables = {
            "sqrt_ab": alphas_cumprod.sqrt(),
            "sqrt_one_minus_ab": (1 - alphas_cumprod).sqrt(),
            "snr": alphas_cumprod / (1 - alphas_cumprod),
        }
        self._device_tables: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    def cache_tables(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> None:
        """Copy the tables to ``device`` now instead of on first use. A compiled training step traced before
        the copies exist would see the cache change after its first call and compile a second time."""
        for name, table in self._tables.items():
            self._device_tables[(name, torch.device(device), dtype)] = table.to(device=device, dtype=dtype)

    def _gather(self, name: str, t: Tensor, like: Tensor | None = None) -> Tensor:
        """Table ``name`` at timesteps ``t``, on ``like``'s device and shaped to broadcast against it."""
        if t.dtype not in (torch.int64, torch.int32) or t.ndim != 1:
            raise ValueError(f"timesteps must be a 1-D integer (Long) tensor [B], got dtype={t.dtype} "
                             f"shape={tuple(t.shape)}")
        if like is None:
            device, dtype, shape = t.device, torch.float32, (-1,)
        else:
            if like.shape[0] != t.shape[0]:
                raise ValueError(f"timesteps have batch {t.shape[0]} but the data has batch {like.shape[0]}; "
                                 "pass one timestep per sample")
            device, dtype = like.device, torch.promote_types(like.dtype, torch.float32)
            shape = (-1,) + (1,) * (like.ndim - 1)
        key = (name, device, dtype)
        table = self._device_tables.get(key)
        if table is None:
            table = self._tables[name].to(device=device, dtype=dtype)
            self._device_tables[key] = table
        return table[t.to(device)].view(shape)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Sample of q(x_t | x0): ``sqrt(ab_t) x0 + sqrt(1 - ab_t) noise``."""
        _check_same_shape(x0, noise, "x0", "noise")
        return self._gather("sqrt_ab", t, x0) * x0 + self._gather("sqrt_one_minus_ab", t, x0) * noise

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ``ab_t / (1 - ab_t)`` as float32 [B] on ``t``'s device (0 at a zero-SNR end)."""
        return self._gather("snr", t)

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The v target of Salimans & Ho: ``sqrt(ab_t) noise - sqrt(1 - ab_t) x0``."""
        _check_same_shape(x0, noise, "x0", "noise")
        return self._gather("sqrt_ab", t, x0) * noise - self._gather("sqrt_one_minus_ab", t, x0) * x0

    def prediction_target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """What the network is trained to output: the noise (``epsilon``) or the velocity (``v_prediction``)."""
        check_prediction_type(prediction_type)
        if prediction_type == "epsilon":
            return noise
        return self.velocity(x0, noise, t)

    def to_x0_eps(self, pred: Tensor, x_t: Tensor, t: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
        """Turn a network prediction at ``x_t`` back into the implied ``(x0, eps)``.

        v_prediction: ``x0 = sqrt(ab) x_t - sqrt(1-ab) v`` and ``eps = sqrt(1-ab) x_t + sqrt(ab) v``, finite
        for every alpha_bar including 0. epsilon: ``x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab)``; where
        alpha_bar is exactly 0 (zero terminal SNR) x_t holds no signal and that quotient is undefined, so x0 is
        returned as 0 there (the mean of normalized data) instead of NaN/inf.
        """
        check_prediction_type(prediction_type)
        _check_same_shape(pred, x_t, "pred", "x_t")
        sqrt_ab = self._gather("sqrt_ab", t, x_t)
        sqrt_one_minus_ab = self._gather("sqrt_one_minus_ab", t, x_t)
        if prediction_type == "v_prediction":
            x0 = sqrt_ab * x_t - sqrt_one_minus_ab * pred
            eps = sqrt_one_minus_ab * x_t + sqrt_ab * pred
            return x0, eps
        has_signal = sqrt_ab > 0
        x0 = (x_t - sqrt_one_minus_ab * pred) / torch.where(has_signal, sqrt_ab, torch.ones_like(sqrt_ab))
        return torch.where(has_signal, x0, torch.zeros_like(x0)), pred

    def sampling_timesteps(self, steps: int, strength: float = 1.0, spacing: str = "trailing") -> Tensor:
        """``steps`` distinct timesteps, descending, as a CPU LongTensor; ``spacing`` says how they are spread.

        "Trailing" spacing (Lin et al. 2024): with ``S = round(strength * T)`` the timesteps are
        ``floor(S * k / steps) - 1`` for ``k = steps .. 1``, so strength 1 starts at ``T - 1`` (pure noise under
        a zero-terminal-SNR schedule) and the last is ``floor(S / steps) - 1``; samplers then step to the clean level.
        ``strength < 1`` (image-to-image) starts at ``S - 1`` instead, still taking ``steps`` steps: noise the
        init latent to ``timesteps[0]`` with :meth:`add_noise` and sample from there. A strength too small to
        reach one level (``S = 0``) starts at the least noisy, ``0``: near 0 keeps the init.

        "Karras" spacing keeps the trailing spacing's first two levels (under a zero-terminal-SNR schedule, pure
        noise and the first finite sigma) and spreads the others evenly in ``sigma^(1 / 7)`` from there down to
        the least noisy level, ``0`` (Karras et al. 2022, eq. 5), each the nearest timestep in log sigma. The last
        step then starts at sigma 0.03 rather than trailing's 0.2 on the default schedule: a final denoise from
        0.2 returns a posterior mean, which shrinks the latents' weak components (fine detail) most.
        """
        if spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {TIMESTEP_SPACINGS}")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        start_level = max(1, round(strength * self.num_steps))
        if not isinstance(steps, int) or not 1 <= steps <= start_level:
            raise ValueError(f"steps must be an integer in [1, {start_level}] (round(strength * num_steps) "
                             f"with strength={strength}), got {steps!r}; use fewer steps or a higher strength")
        k = torch.arange(steps, 0, -1, dtype=torch.int64)
        # integer floor division: consecutive values differ by >= floor(start_level / steps) >= 1, so no repeats
        trailing = start_level * k // steps - 1
        if spacing == "trailing" or steps < 3:
            return trailing
        return torch.cat([trailing[:1], self._karras_from(int(trailing[1]), steps - 1)])

    def _karras_from(self, first: int, count: int) -> Tensor:
        """``count`` distinct descending timesteps from ``first`` to 0, evenly spaced in sigma^(1 / rho)."""
        top, bottom = (float(self.sigmas[t]) ** (1 / KARRAS_RHO) for t in (first, 0))
        targets = [(top + i / (count - 1) * (bottom - top)) ** KARRAS_RHO for i in range(count)]
        log_sigmas = self.sigmas[:first + 1].log()
        chosen = [first]
        for i, sigma in enumerate(targets[1:], start=1):
            nearest = int((log_sigmas - math.log(sigma)).abs().argmin())
            # strictly below the previous level, with room left for the levels still to come
            chosen.append(max(min(nearest, chosen[-1] - 1), count - 1 - i))
        return torch.tensor(chosen, dtype=torch.int64)


def _check_same_shape(a: Tensor, b: Tensor, a_name: str, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} has shape {tuple(a.shape)} but {b_name} has shape {tuple(b.shape)}; "
                         "they must match")

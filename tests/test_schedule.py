"""Noise schedules against closed forms, and the x0/eps/v conversions."""

import math

import pytest
import torch

from diffusion.schedule import NoiseSchedule, ScheduleConfig

T = 1000


def _t(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def test_linear_betas_are_evenly_spaced_between_the_endpoints():
    schedule = NoiseSchedule(ScheduleConfig(kind="linear", beta_start=1e-4, beta_end=0.02))
    betas = schedule.betas
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    torch.testing.assert_close(betas.diff(), torch.full((T - 1,), (0.02 - 1e-4) / (T - 1), dtype=torch.float64))
    for t in (0, 1, 500, T - 1):
        expected = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / (T - 1)) for i in range(t + 1))
        assert schedule.alphas_cumprod[t].item() == pytest.approx(expected, rel=1e-10)


def test_scaled_linear_is_linear_in_sqrt_beta():
    schedule = NoiseSchedule(ScheduleConfig())
    root = schedule.betas.sqrt()
    assert schedule.betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert schedule.betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    step = (math.sqrt(0.012) - math.sqrt(0.00085)) / (T - 1)
    torch.testing.assert_close(root.diff(), torch.full((T - 1,), step, dtype=torch.float64))
    torch.testing.assert_close(schedule.alphas_cumprod, torch.cumprod(1 - schedule.betas, 0))


def test_cosine_alphas_cumprod_follow_the_closed_form():
    schedule = NoiseSchedule(ScheduleConfig(kind="cosine"))
    s = 0.008

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    clipped = schedule.betas >= 0.999
    assert clipped.any() and clipped[-1]  # the clip is what keeps the last alpha_bar > 0
    first_clipped = int(clipped.nonzero()[0])
    for t in (0, 1, 10, 300, 700, first_clipped - 1):
        assert schedule.alphas_cumprod[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-9)
    assert schedule.betas.max().item() == pytest.approx(0.999)
    assert schedule.alphas_cumprod[-1] > 0


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_ends_at_pure_noise_and_keeps_the_start(kind):
    plain = NoiseSchedule(ScheduleConfig(kind=kind))
    rescaled = NoiseSchedule(ScheduleConfig(kind=kind, zero_terminal_snr=True))
    assert rescaled.alphas_cumprod[-1].item() == 0.0
    assert rescaled.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-12)
    # sqrt(alpha_bar) is an affine map of the original: shift to 0 at the end, scale to keep the start
    old, new = plain.alphas_cumprod.sqrt(), rescaled.alphas_cumprod.sqrt()
    expected = (old - old[-1]) * old[0] / (old[0] - old[-1])
    torch.testing.assert_close(new, expected)
    assert (rescaled.alphas_cumprod.diff() < 0).all()
    assert rescaled.betas[-1].item() == 1.0
    torch.testing.assert_close(torch.cumprod(1 - rescaled.betas, 0), rescaled.alphas_cumprod)
    assert rescaled.snr(_t(T - 1)).item() == 0.0


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_snr_shift_divides_every_steps_snr_and_keeps_the_zero_snr_end(zero_terminal_snr):
    plain = NoiseSchedule(ScheduleConfig(zero_terminal_snr=zero_terminal_snr))
    shifted = NoiseSchedule(ScheduleConfig(zero_terminal_snr=zero_terminal_snr, snr_shift=4.0))
    t = torch.arange(T)
    torch.testing.assert_close(shifted.snr(t).double(), plain.snr(t).double() / 4, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.cumprod(1 - shifted.betas, 0), shifted.alphas_cumprod)
    noisy = slice(None, -1) if zero_terminal_snr else slice(None)  # the zero-SNR end cannot get noisier
    assert (shifted.alphas_cumprod[noisy] < plain.alphas_cumprod[noisy]).all()
    assert (shifted.alphas_cumprod.diff() < 0).all()
    assert (shifted.alphas_cumprod[-1].item() == 0.0) == zero_terminal_snr
    # sigma = sqrt((1 - ab) / ab) doubles at every step: the guidance interval's units see the shift
    sigma = lambda ab: ((1 - ab[:-1]) / ab[:-1]).sqrt()  # noqa: E731
    torch.testing.assert_close(sigma(shifted.alphas_cumprod), 2 * sigma(plain.alphas_cumprod))
    unshifted = NoiseSchedule(ScheduleConfig(zero_terminal_snr=zero_terminal_snr, snr_shift=1.0))
    assert torch.equal(unshifted.alphas_cumprod, plain.alphas_cumprod) and torch.equal(unshifted.betas, plain.betas)


@pytest.mark.parametrize("config, message", [
    (ScheduleConfig(snr_shift=0.0), "snr_shift must be a positive number"),
    (ScheduleConfig(snr_shift=float("inf")), "snr_shift must be a positive number"),
    (ScheduleConfig(kind="quadratic"), "unknown noise schedule kind"),
    (ScheduleConfig(num_steps=1), "num_steps"),
    (ScheduleConfig(beta_start=0.02, beta_end=0.01), "beta_start <= beta_end"),
    (ScheduleConfig(kind="linear", beta_end=1.5), "beta_end < 1"),
])
def test_bad_configs_raise_clear_errors(config, message):
    with pytest.raises(ValueError, match=message):
        NoiseSchedule(config)


def test_add_noise_matches_the_formula_per_sample_and_preserves_unit_variance():
    schedule = NoiseSchedule(ScheduleConfig())
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=generator)
    noise = torch.randn(4, 3, 8, 8, generator=generator)
    t = _t(0, 10, 500, 999)
    x_t = schedule.add_noise(x0, noise, t)
    assert x_t.dtype == torch.float32
    ab = schedule.alphas_cumprod[t].float().view(4, 1, 1, 1)
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)

    # variance preserving: unit-variance data stays unit variance, and the signal part has mean sqrt(ab) * x0
    n = 200_000
    big_x0 = torch.randn(n, generator=generator, dtype=torch.float64)
    big_noise = torch.randn(n, generator=generator, dtype=torch.float64)
    t = torch.full((n,), 300, dtype=torch.long)
    noisy = schedule.add_noise(big_x0, big_noise, t)
    assert noisy.var().item() == pytest.approx(1.0, abs=0.015)
    shifted = schedule.add_noise(big_x0 + 2.0, big_noise, t)
    assert shifted.mean().item() == pytest.approx(2.0 * schedule.alphas_cumprod[300].sqrt().item(), abs=0.01)


def test_snr_and_velocity_closed_forms():
    schedule = NoiseSchedule(ScheduleConfig())
    t = _t(0, 250, 999)
    ab = schedule.alphas_cumprod[t]
    torch.testing.assert_close(schedule.snr(t), (ab / (1 - ab)).float())
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 16, generator=generator, dtype=torch.float64)
    noise = torch.randn(3, 16, generator=generator, dtype=torch.float64)
    v = schedule.velocity(x0, noise, t)
    torch.testing.assert_close(v, ab.sqrt()[:, None] * noise - (1 - ab).sqrt()[:, None] * x0)
    # (x_t, v) is a rotation of (x0, eps), so the squared norm is kept element-wise
    x_t = schedule.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t ** 2 + v ** 2, x0 ** 2 + noise ** 2)


def test_noise_levels_are_sqrt_of_the_inverse_snr_and_infinite_at_a_zero_snr_end():
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    ab = schedule.alphas_cumprod
    assert schedule.sigmas[-1] == math.inf
    torch.testing.assert_close(schedule.sigmas[:-1], (1 / schedule.snr(torch.arange(999)).double()).sqrt(),
                               rtol=1e-5, atol=0)  # snr is float32
    assert schedule.sigmas[500] == pytest.approx(math.sqrt((1 - float(ab[500])) / float(ab[500])))
    assert torch.all(schedule.sigmas[1:] > schedule.sigmas[:-1])  # noisier with every timestep


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_to_x0_eps_inverts_prediction_target(prediction_type, zero_terminal_snr):
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=zero_terminal_snr))
    generator = torch.Generator().manual_seed(2)
    x0 = torch.randn(5, 4, 6, 6, generator=generator, dtype=torch.float64)
    noise = torch.randn(5, 4, 6, 6, generator=generator, dtype=torch.float64)
    # the last timestep has alpha_bar = 0 under zero terminal SNR, where epsilon cannot recover x0
    last = T - 2 if zero_terminal_snr and prediction_type == "epsilon" else T - 1
    t = _t(0, 1, 400, 900, last)
    x_t = schedule.add_noise(x0, noise, t)
    target = schedule.prediction_target(x0, noise, t, prediction_type)
    x0_back, noise_back = schedule.to_x0_eps(target, x_t, t, prediction_type)
    torch.testing.assert_close(x0_back, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(noise_back, noise, rtol=1e-9, atol=1e-9)


def test_to_x0_eps_is_finite_at_zero_terminal_snr():
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 8, generator=generator)
    noise = torch.randn(2, 8, generator=generator)
    t = _t(T - 1, T - 1)
    x_t = schedule.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, noise)  # pure noise

    v = schedule.prediction_target(x0, noise, t, "v_prediction")
    torch.testing.assert_close(v, -x0)
    x0_back, noise_back = schedule.to_x0_eps(v, x_t, t, "v_prediction")
    torch.testing.assert_close(x0_back, x0)
    torch.testing.assert_close(noise_back, noise)

    x0_eps, eps = schedule.to_x0_eps(noise, x_t, t, "epsilon")
    assert torch.equal(x0_eps, torch.zeros_like(x0_eps))  # documented: no signal, so the data mean 0
    assert torch.equal(eps, noise)


def test_bad_inputs_raise_clear_errors():
    schedule = NoiseSchedule(ScheduleConfig())
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="integer"):
        schedule.add_noise(x, x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="batch"):
        schedule.add_noise(x, x, _t(1, 2, 3))
    with pytest.raises(ValueError, match="shape"):
        schedule.add_noise(x, torch.zeros(2, 4), _t(1, 2))
    with pytest.raises(ValueError, match="prediction_type"):
        schedule.prediction_target(x, x, _t(1, 2), "sample")


def test_sampling_timesteps_trailing_spacing():
    schedule = NoiseSchedule(ScheduleConfig())
    steps = schedule.sampling_timesteps(50)
    assert steps.dtype == torch.long and steps.shape == (50,)
    assert steps[0].item() == T - 1 and steps[-1].item() == 19
    assert (steps.diff() == -20).all()
    assert torch.equal(schedule.sampling_timesteps(T), torch.arange(T - 1, -1, -1))
    assert schedule.sampling_timesteps(3).tolist() == [999, 665, 332]
    uneven = schedule.sampling_timesteps(7)
    assert uneven[0].item() == T - 1 and (uneven.diff() < 0).all()


@pytest.mark.parametrize("zero_terminal_snr", [True, False])
def test_karras_spacing_keeps_trailings_start_and_runs_evenly_in_sigma_root_to_the_least_noisy_level(
        zero_terminal_snr):
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=zero_terminal_snr))
    for steps, strength in ((25, 1.0), (10, 1.0), (25, 0.6), (T, 1.0)):
        trailing = schedule.sampling_timesteps(steps, strength)
        karras = schedule.sampling_timesteps(steps, strength, spacing="karras")
        assert karras.dtype == torch.long and karras.shape == (steps,)
        assert karras[:2].tolist() == trailing[:2].tolist() and karras[-1].item() == 0
        assert (karras.diff() < 0).all()  # distinct, descending
    # below the first two levels sigma^(1/7) falls by an even amount per step, up to the rounding to a timestep
    levels = schedule.sampling_timesteps(25, spacing="karras")
    roots = schedule.sigmas[levels[1:]] ** (1 / 7)
    even = torch.linspace(float(roots[0]), float(roots[-1]), 24, dtype=torch.float64)
    assert (roots - even).abs().max() < 0.2 * (roots[0] - roots[-1]) / 23  # a fifth of the even step
    # one or two steps have no levels to spread: the same as trailing
    for steps in (1, 2):
        assert torch.equal(schedule.sampling_timesteps(steps, spacing="karras"), schedule.sampling_timesteps(steps))
    with pytest.raises(ValueError, match="unknown timestep spacing 'leading'; choose one of"):
        schedule.sampling_timesteps(10, spacing="leading")


def test_sampling_timesteps_with_strength_start_lower():
    schedule = NoiseSchedule(ScheduleConfig())
    steps = schedule.sampling_timesteps(10, strength=0.5)
    assert steps.shape == (10,)
    assert steps[0].item() == 499 and steps[-1].item() == 49
    assert (steps.diff() == -50).all()
    assert schedule.sampling_timesteps(30, strength=0.03).tolist() == list(range(29, -1, -1))
    assert schedule.sampling_timesteps(1, strength=1e-6).tolist() == [0]  # below one level: the least noisy
    with pytest.raises(ValueError, match="strength"):
        schedule.sampling_timesteps(10, strength=0.0)
    with pytest.raises(ValueError, match="strength"):
        schedule.sampling_timesteps(10, strength=1.5)
    with pytest.raises(ValueError, match="steps"):
        schedule.sampling_timesteps(31, strength=0.03)
    with pytest.raises(ValueError, match="steps"):
        schedule.sampling_timesteps(0)

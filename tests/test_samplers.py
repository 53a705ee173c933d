"""Samplers against the exact answer for Gaussian data.

For data x0 ~ N(mu, s^2) per dimension the optimal denoiser is closed form,
E[x0 | x_t] = mu + sqrt(ab) s^2 / (ab s^2 + 1 - ab) (x_t - sqrt(ab) mu), so a correct sampler driven by it must
reproduce the data distribution. Every sampler ends by returning the denoised estimate at the last timestep
t_L, whose variance is that of E[x0 | x_{t_L}], i.e. s^2 * ab_L s^2 / (ab_L s^2 + 1 - ab_L) (slightly below s^2);
the tests compare against that exact target so that the tolerances measure only the sampler's own error.

The starting noise is standardized per dimension (empirical mean 0, variance 1). The deterministic samplers are
affine per dimension for this denoiser, so their output moments then carry no sampling error at all and the
tolerances can be tight; the stochastic ones keep the Monte-Carlo error of their injected noise (~1% on the
variance with 20k samples).
"""

import pytest
import torch

from diffusion.noise import PerSampleNoise, generator_noise
from diffusion.samplers import SAMPLERS, ddim_invert, sample_ddim, sample_ddpm, sample_dpmpp_2m
from diffusion.schedule import NoiseSchedule, ScheduleConfig

MU = torch.tensor([-1.0, 0.5, 2.0, 0.0], dtype=torch.float64)
STD = torch.tensor([0.6, 1.0, 2.0, 0.8], dtype=torch.float64)
NUM_SAMPLES = 20_000


def gaussian_denoiser(schedule: NoiseSchedule):
    alphas_cumprod = schedule.alphas_cumprod

    def denoise(x_t: torch.Tensor, t: int) -> torch.Tensor:
        assert type(t) is int  # a host int: the samplers never hand a denoiser a device value to read
        ab = alphas_cumprod[t]
        gain = ab.sqrt() * STD ** 2 / (ab * STD ** 2 + 1 - ab)
        return MU + gain * (x_t - ab.sqrt() * MU)

    return denoise


def start_noise(schedule: NoiseSchedule, first_t: int, seed: int = 0) -> torch.Tensor:
    """Samples of the exact marginal at ``first_t`` (N(0, I) under zero terminal SNR), standardized per dim."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(NUM_SAMPLES, len(MU), generator=generator, dtype=torch.float64)
    z = (z - z.mean(0)) / z.std(0)
    ab = schedule.alphas_cumprod[first_t]
    return ab.sqrt() * MU + (ab * STD ** 2 + 1 - ab).sqrt() * z


def relative_moment_errors(schedule: NoiseSchedule, out: torch.Tensor, last_t: int):
    ab = schedule.alphas_cumprod[last_t]
    target_var = STD ** 2 * ab * STD ** 2 / (ab * STD ** 2 + 1 - ab)
    mean_error = ((out.mean(0) - MU) / STD).abs().max().item()
    var_error = (out.var(0) / target_var - 1).abs().max().item()
    return mean_error, var_error


def run_sampler(schedule, sampler, steps, seed=1, **kwargs):
    timesteps = schedule.sampling_timesteps(steps)
    x = start_noise(schedule, int(timesteps[0]))
    out = sampler(gaussian_denoiser(schedule), schedule, x, timesteps, **kwargs)
    assert out.shape == x.shape and out.dtype == x.dtype
    return relative_moment_errors(schedule, out, int(timesteps[-1]))




@pytest.fixture(params=[True, False], ids=["zero_terminal_snr", "scaled_linear"])
def schedule(request) -> NoiseSchedule:
    return NoiseSchedule(ScheduleConfig(zero_terminal_snr=request.param))


@pytest.mark.parametrize("sampler", [sample_ddim, sample_dpmpp_2m])
def test_karras_spacing_keeps_the_weak_components_that_trailings_last_denoise_shrinks(sampler):
    # zero-mean data whose components have std 1, 0.2 and 0.05 (a latent's strong and weak, detailed parts), the
    # exact denoiser: trailing's last step returns the posterior mean at sigma 0.2, which keeps a quarter of the
    # weakest component's spread; karras's starts at sigma 0.03
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    std = torch.tensor([1.0, 0.2, 0.05], dtype=torch.float64)

    def denoise(x_t: torch.Tensor, t: int) -> torch.Tensor:
        ab = schedule.alphas_cumprod[t]
        return ab.sqrt() * std ** 2 / (ab * std ** 2 + 1 - ab) * x_t

    x = torch.randn(NUM_SAMPLES, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)  # pure noise: the zero-terminal-SNR start
    kept = {spacing: sampler(denoise, schedule, x, schedule.sampling_timesteps(25, spacing=spacing)).std(0) / std
            for spacing in ("trailing", "karras")}
    assert kept["trailing"][2] < 0.3 and kept["karras"][2] > 0.75
    assert kept["trailing"][1] < 0.75 and kept["karras"][1] > 0.85
    assert (kept["karras"][0] - 1).abs() < 0.1 and (kept["trailing"][0] - 1).abs() < 0.1


def test_ddim_deterministic_reproduces_the_gaussian(schedule):
    # first order: ~2.5% variance error at 100 steps, ~10% at 20
    mean_error, var_error = run_sampler(schedule, sample_ddim, 100, eta=0.0)
    assert mean_error < 1e-6
    assert var_error < 0.04


def test_dpmpp_2m_reproduces_the_gaussian_far_better_than_first_order(schedule):
    mean_error, var_error = run_sampler(schedule, sample_dpmpp_2m, 25)
    _, first_order_var_error = run_sampler(schedule, sample_ddim, 25)
    assert mean_error < 1e-6
    assert var_error < 0.015
    assert first_order_var_error > 4 * var_error  # the multistep correction does its job


def test_ddpm_reproduces_the_gaussian():
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    generator = torch.Generator().manual_seed(5)
    mean_error, var_error = run_sampler(schedule, sample_ddpm, 400, noise=generator_noise(generator))
    assert mean_error < 0.04  # ~5 standard errors of the mean
    assert var_error < 0.05  # ~1.5% bias at 400 steps + Monte-Carlo error


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_dpmpp_2m_sde_reproduces_the_gaussian(eta):
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    mean_error, var_error = run_sampler(schedule, sample_dpmpp_2m, 50, eta=eta,
                                        noise=generator_noise(torch.Generator().manual_seed(9)))
    _, ddpm_var_error = run_sampler(schedule, sample_ddpm, 50, noise=generator_noise(torch.Generator().manual_seed(9)))
    assert mean_error < 0.04  # ~5 standard errors of the mean
    assert var_error < 0.06  # ~1 % at 200 steps: Monte-Carlo error plus what is left of the discretisation's
    assert ddpm_var_error > 2 * var_error  # second order beats the first-order ancestral sampler at equal steps


def test_dpmpp_2m_sde_at_eta_one_is_ancestral_ddpm_when_the_estimate_does_not_move():
    # with an x0 estimate that never changes the multistep correction vanishes, so only the first-order SDE step
    # is left, and at eta = 1 that is the DDPM posterior step: the same noise gives the same samples
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    timesteps = schedule.sampling_timesteps(20)
    x = start_noise(schedule, int(timesteps[0]))[:500]

    def fixed_estimate(x_t, t):
        return MU.expand_as(x_t)

    def run(sampler, **kwargs):
        return sampler(fixed_estimate, schedule, x, timesteps, noise=generator_noise(torch.Generator().manual_seed(4)),
                       callback=lambda i, x_i, x0: steps.append(x_i), **kwargs)

    steps = []
    ddpm = run(sample_ddpm)
    ddpm_steps, steps = steps, []
    sde = run(sample_dpmpp_2m, eta=1.0)
    for a, b in zip(ddpm_steps, steps, strict=True):  # every intermediate step, not only the end (which is MU)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
    assert torch.equal(sde, ddpm)


def test_dpmpp_2m_noise_grows_with_eta():
    # the same noise stream, more of it at larger eta: the samples move away from the deterministic solver's.
    # (Not on a zero-terminal-SNR schedule: from pure noise the first step is ancestral at any eta > 0.)
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=False))
    timesteps = schedule.sampling_timesteps(10)
    x = start_noise(schedule, int(timesteps[0]))[:200]
    denoiser = gaussian_denoiser(schedule)
    ode = sample_dpmpp_2m(denoiser, schedule, x, timesteps)
    distance = [(sample_dpmpp_2m(denoiser, schedule, x, timesteps, eta=eta,
                                 noise=generator_noise(torch.Generator().manual_seed(3))) - ode).abs().mean().item()
                for eta in (0.0, 0.05, 0.25, 1.0)]
    assert distance[0] == 0.0 and 0 < distance[1] < distance[2] < distance[3]


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_step_noise_only_below_eta_sigma_max(name):
    # the steps that start above the limit are the deterministic sampler's, bit for bit; the noise is drawn once
    # per step at or below it (but the last, to the clean level, which has none), and from there on the path
    # leaves the deterministic one
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    timesteps = schedule.sampling_timesteps(10)
    ab = schedule.alphas_cumprod[timesteps]
    sigmas = ((1 - ab) / ab).sqrt().tolist()  # inf first (pure noise), then falling
    limit = (sigmas[4] + sigmas[5]) / 2  # steps 0-4 above, 5-9 below
    x = start_noise(schedule, int(timesteps[0]))[:200]
    draws = []

    def counted_noise(like):
        draws.append(1)
        return torch.randn(like.shape, generator=generator, dtype=like.dtype)

    def run(**kwargs):
        path = []
        out = SAMPLERS[name](gaussian_denoiser(schedule), schedule, x, timesteps, noise=counted_noise,
                             callback=lambda i, x_i, x0: path.append(x_i), **kwargs)
        return out, path

    generator = torch.Generator().manual_seed(2)
    _, deterministic = run()
    _, windowed = run(eta=1.0, eta_sigma_max=limit)
    assert len(draws) == 4
    for i in range(5):
        assert torch.equal(windowed[i], deterministic[i])
    assert all((windowed[i] - deterministic[i]).abs().mean() > 1e-3 for i in range(5, 9))

    # a limit above every finite level: noise at every step but the first, from pure noise (which eta alone
    # makes ancestral on this schedule, replacing the start noise)
    generator = torch.Generator().manual_seed(2)
    everywhere_out, _ = run(eta=1.0)
    generator = torch.Generator().manual_seed(2)
    draws.clear()
    above_all_out, _ = run(eta=1.0, eta_sigma_max=2 * sigmas[1])
    assert len(draws) == 8 and not torch.equal(above_all_out, everywhere_out)
    # a limit below every level: the deterministic sampler, and no draw at all
    draws.clear()
    assert torch.equal(run(eta=1.0, eta_sigma_max=1e-6)[0], run()[0]) and not draws


def test_step_noise_limit_at_inf_is_every_step():
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=False))
    timesteps = schedule.sampling_timesteps(8)
    x = start_noise(schedule, int(timesteps[0]))[:100]

    def run(**kwargs):
        return sample_dpmpp_2m(gaussian_denoiser(schedule), schedule, x, timesteps, eta=0.5,
                               noise=generator_noise(torch.Generator().manual_seed(1)), **kwargs)

    assert torch.equal(run(eta_sigma_max=float("inf")), run())


@pytest.mark.parametrize("name, eta, sigma_max, message", [
    ("ddpm", 0.0, 2.0, "eta_sigma_max=2.0 applies to the ddim and dpmpp_2m samplers only"),
    ("dpmpp_2m", 0.0, 2.0, "eta is 0"),
    ("ddim", 1.0, 0.0, "eta_sigma_max must be a noise level sigma > 0"),
    ("ddim", 1.0, float("nan"), "eta_sigma_max must be a noise level sigma > 0")])
def test_bad_eta_sigma_max_is_refused(name, eta, sigma_max, message):
    schedule = NoiseSchedule(ScheduleConfig())
    with pytest.raises(ValueError, match=message):
        SAMPLERS[name](gaussian_denoiser(schedule), schedule, torch.zeros(2, 4, dtype=torch.float64),
                       schedule.sampling_timesteps(3), eta=eta, eta_sigma_max=sigma_max)


def test_ddim_with_full_noise_reproduces_the_gaussian():
    schedule = NoiseSchedule(ScheduleConfig())
    generator = torch.Generator().manual_seed(6)
    mean_error, var_error = run_sampler(schedule, sample_ddim, 400, eta=1.0, noise=generator_noise(generator))
    assert mean_error < 0.04
    assert var_error < 0.05


def test_ddim_eta_one_is_ancestral_ddpm():
    # the DDIM update with eta = 1 is algebraically the DDPM posterior step; same noise gives the same samples
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    timesteps = schedule.sampling_timesteps(30)
    x = start_noise(schedule, int(timesteps[0]))[:500]
    denoiser = gaussian_denoiser(schedule)
    ddpm = sample_ddpm(denoiser, schedule, x, timesteps, noise=generator_noise(torch.Generator().manual_seed(7)))
    ddim = sample_ddim(denoiser, schedule, x, timesteps, eta=1.0,
                       noise=generator_noise(torch.Generator().manual_seed(7)))
    # only rounding differs (sqrt of a near-cancelling 1 - ab_s - std^2); a wrong coefficient shows at 1e-2
    torch.testing.assert_close(ddim, ddpm, rtol=1e-5, atol=1e-7)


def test_ddim_eta_zero_is_deterministic_and_does_not_touch_the_generator():
    schedule = NoiseSchedule(ScheduleConfig())
    timesteps = schedule.sampling_timesteps(10)
    x = start_noise(schedule, int(timesteps[0]))[:100]
    generator = torch.Generator().manual_seed(8)
    state = generator.get_state()
    first = sample_ddim(gaussian_denoiser(schedule), schedule, x, timesteps, noise=generator_noise(generator))
    second = sample_ddim(gaussian_denoiser(schedule), schedule, x.clone(), timesteps)
    assert torch.equal(first, second)
    assert torch.equal(generator.get_state(), state)


def test_stochastic_samplers_follow_the_generator():
    schedule = NoiseSchedule(ScheduleConfig())
    timesteps = schedule.sampling_timesteps(10)
    x = start_noise(schedule, int(timesteps[0]))[:100]
    denoiser = gaussian_denoiser(schedule)
    runs = [sample_ddpm(denoiser, schedule, x, timesteps, noise=generator_noise(torch.Generator().manual_seed(seed)))
            for seed in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def test_ddim_inversion_round_trips_to_first_order():
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    denoiser = gaussian_denoiser(schedule)
    generator = torch.Generator().manual_seed(9)
    x0 = MU + STD * torch.randn(2000, len(MU), generator=generator, dtype=torch.float64)

    def round_trip_error(steps: int) -> float:
        timesteps = schedule.sampling_timesteps(steps)
        x_noise = ddim_invert(denoiser, schedule, x0, timesteps)
        back = sample_ddim(denoiser, schedule, x_noise, timesteps)
        return ((back - x0) / STD).pow(2).mean().sqrt().item()

    coarse, fine = round_trip_error(250), round_trip_error(500)
    assert fine < 0.007  # relative RMS error, ~0.45% at 500 steps
    assert 0.4 < fine / coarse < 0.65  # halving the step size halves the error: first order


def test_ddim_inversion_of_data_gives_standard_noise():
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    generator = torch.Generator().manual_seed(10)
    x0 = MU + STD * torch.randn(NUM_SAMPLES, len(MU), generator=generator, dtype=torch.float64)
    x_noise = ddim_invert(gaussian_denoiser(schedule), schedule, x0, schedule.sampling_timesteps(200))
    assert x_noise.mean(0).abs().max().item() < 0.08
    assert (x_noise.var(0) - 1).abs().max().item() < 0.06


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_sees_every_step(name):
    schedule = NoiseSchedule(ScheduleConfig())
    timesteps = schedule.sampling_timesteps(7)
    x = start_noise(schedule, int(timesteps[0]))[:16]
    seen = []
    out = SAMPLERS[name](gaussian_denoiser(schedule), schedule, x, timesteps,
                         callback=lambda i, x_i, x0_hat: seen.append((i, x_i.shape, x0_hat.shape)))
    assert [i for i, _, _ in seen] == list(range(7))
    assert all(shape == x.shape and x0_shape == x.shape for _, shape, x0_shape in seen)
    assert out.shape == x.shape


def test_float32_images_keep_their_dtype():
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(11))

    def shrink(x_t, t):
        return 0.5 * x_t

    for name, sampler in SAMPLERS.items():
        out = sampler(shrink, schedule, x, schedule.sampling_timesteps(5))
        assert out.dtype == torch.float32 and out.shape == x.shape and torch.isfinite(out).all(), name


@pytest.mark.parametrize("timesteps, message", [
    (torch.tensor([10, 20]), "descending"),
    (torch.tensor([1000, 20]), "lie in"),
    (torch.tensor([10.0, 5.0]), "integer"),
    (torch.tensor([], dtype=torch.long), "non-empty"),
])
def test_bad_timesteps_raise_clear_errors(timesteps, message):
    schedule = NoiseSchedule(ScheduleConfig())
    with pytest.raises(ValueError, match=message):
        sample_ddim(gaussian_denoiser(schedule), schedule, torch.zeros(2, 4, dtype=torch.float64), timesteps)


@pytest.mark.parametrize("name, eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0), ("dpmpp_2m", 0.0),
                                       ("dpmpp_2m", 0.5)])
def test_every_sampler_gives_a_seed_the_same_sample_alone_and_in_a_batch(name, eta):
    schedule = NoiseSchedule(ScheduleConfig())
    timesteps = schedule.sampling_timesteps(6)

    def denoiser(x_t, t):  # mixes nothing across the batch, like the UNet
        return 0.5 * torch.tanh(x_t)

    def sample(seeds):
        noise = PerSampleNoise(seeds)
        return SAMPLERS[name](denoiser, schedule, noise.initial((4, 3, 3)), timesteps, noise=noise, eta=eta)

    batch = sample([3, 4, 5])
    alone = sample([4])
    assert torch.equal(alone[0], batch[1])
    assert not torch.allclose(batch[0], batch[1])  # different seeds differ


@pytest.mark.parametrize("name, eta, message", [("ddpm", 0.5, "eta=0.5 applies to the ddim and dpmpp_2m samplers only"),
                                                 ("dpmpp_2m", 1.5, "eta must be in \\[0, 1\\]"),
                                                 ("ddim", -0.1, "eta must be in \\[0, 1\\]")])
def test_eta_out_of_its_range_is_refused(name, eta, message):
    schedule = NoiseSchedule(ScheduleConfig())
    with pytest.raises(ValueError, match=message):
        SAMPLERS[name](gaussian_denoiser(schedule), schedule, torch.zeros(2, 4, dtype=torch.float64),
                       schedule.sampling_timesteps(3), eta=eta)


def test_dpmpp_2m_steps_first_order_at_the_named_timesteps(schedule):
    timesteps = schedule.sampling_timesteps(8)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def denoiser(x_t, t):  # an estimate that moves from step to step, so the extrapolation matters
        return 0.5 * torch.tanh(x_t) + t / 1000

    def trajectory(**kwargs):
        xs = []
        out = sample_dpmpp_2m(denoiser, schedule, x, timesteps, callback=lambda i, x_i, _: xs.append(x_i), **kwargs)
        return out, xs

    # first order at every step is the first-order DPM-Solver++ step, i.e. DDIM
    everywhere, _ = trajectory(first_order_at=set(timesteps.tolist()))
    torch.testing.assert_close(everywhere, sample_ddim(denoiser, schedule, x, timesteps))
    # at one step: the same path before it, another from it on
    plain, plain_xs = trajectory()
    _, edge_xs = trajectory(first_order_at={int(timesteps[4])})
    assert all(torch.equal(a, b) for a, b in zip(plain_xs[:4], edge_xs[:4]))
    assert not torch.allclose(plain_xs[4], edge_xs[4])
    assert not torch.allclose(plain, everywhere)

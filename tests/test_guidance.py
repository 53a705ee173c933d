"""Classifier-free guidance with a toy linear model whose output depends on x, t and the context."""

import argparse

import pytest
import torch

from diffusion.guidance import (anneal_condition, cfg_denoiser, guided_sample_and_decode, check_condition_noise, check_guidance_interval,
                                condition_noise_table, guidance_edges, guidance_scale_table, has_levels_above,
                                rescale_guided, step_guidance, unconditional_rows)
from diffusion.noise import PerSampleNoise
from diffusion.samplers import sample_ddim, sample_dpmpp_2m
from diffusion.schedule import NoiseSchedule, ScheduleConfig

BATCH, LENGTH, WIDTH = 3, 5, 4


class ToyModel:
    """pred = 0.9 x + t / 1000 + (mean of the context, per sample); records the batch of every call."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        assert x_t.shape[0] == t.shape[0] == context.shape[0]
        self.batches.append(x_t.shape[0])
        per_sample = context.mean(dim=(1, 2)) + t.float() / 1000
        return 0.9 * x_t + per_sample.view(-1, 1, 1, 1)


def batch_of(t: int) -> torch.Tensor:
    return torch.full((BATCH,), t)


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(BATCH, 4, 8, 8, generator=generator)
    t = 500  # the samplers call a denoiser with the step's timestep as a host int
    cond = torch.randn(BATCH, LENGTH, WIDTH, generator=generator) + 1.0
    uncond = torch.randn(BATCH, LENGTH, WIDTH, generator=generator) - 1.0
    return x_t, t, cond, uncond


def guided_x0(schedule, x_t, t, cond, uncond, scale, prediction_type):
    """The closed form: x0 implied by uncond + scale * (cond - uncond) of the toy model's predictions."""
    t = batch_of(t)
    pred_cond, pred_uncond = ToyModel()(x_t, t, cond), ToyModel()(x_t, t, uncond.expand_as(cond))
    return schedule.to_x0_eps(pred_uncond + scale * (pred_cond - pred_uncond), x_t, t, prediction_type)[0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_scale_one_is_the_conditional_prediction_in_one_unguided_pass(inputs, prediction_type):
    x_t, t, cond, uncond = inputs
    schedule = NoiseSchedule(ScheduleConfig())
    model = ToyModel()
    x0 = cfg_denoiser(model, schedule, prediction_type, cond, uncond, 1.0)(x_t, t)
    expected, _ = schedule.to_x0_eps(ToyModel()(x_t, batch_of(t), cond), x_t, batch_of(t), prediction_type)
    assert torch.equal(x0, expected)
    assert model.batches == [BATCH]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_guided_prediction_extrapolates_from_uncond_to_cond_in_one_batched_pass(inputs, prediction_type):
    x_t, t, cond, uncond = inputs
    schedule = NoiseSchedule(ScheduleConfig())
    model = ToyModel()
    x0 = cfg_denoiser(model, schedule, prediction_type, cond, uncond, 3.0)(x_t, t)
    # a swapped [cond; uncond] order would give cond + 3 (uncond - cond), far from this
    torch.testing.assert_close(x0, guided_x0(schedule, x_t, t, cond, uncond, 3.0, prediction_type))
    assert model.batches == [2 * BATCH]


class WeakerToyModel(ToyModel):
    """A guide for autoguidance: the toy model's prediction, off by a context-dependent error."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return super().__call__(x_t, t, context) * 0.8 - context.std(dim=(1, 2)).view(-1, 1, 1, 1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_autoguidance_extrapolates_from_the_guide_on_the_prompt_alone_or_beside_classifier_free(inputs,
                                                                                              prediction_type):
    x_t, t, cond, uncond = inputs
    schedule = NoiseSchedule(ScheduleConfig())
    pred_cond, pred_guide = ToyModel()(x_t, batch_of(t), cond), WeakerToyModel()(x_t, batch_of(t), cond)
    pred_uncond = ToyModel()(x_t, batch_of(t), uncond)

    def x0_of(pred):
        return schedule.to_x0_eps(pred, x_t, batch_of(t), prediction_type)[0]

    # alone (classifier-free scale 1): from the guide on the prompt to the model, one pass of each
    model, guide = ToyModel(), WeakerToyModel()
    alone = cfg_denoiser(model, schedule, prediction_type, cond, uncond, 1.0, guide_model=guide,
                         autoguidance_scale=3.0)(x_t, t)
    torch.testing.assert_close(alone, x0_of(pred_guide + 3.0 * (pred_cond - pred_guide)))  # the guide sees the prompt
    assert model.batches == [BATCH] and guide.batches == [BATCH]
    # beside classifier-free guidance: both pushes add, in one batched pass and one pass of the guide
    model, guide = ToyModel(), WeakerToyModel()
    both = cfg_denoiser(model, schedule, prediction_type, cond, uncond, 4.0, guide_model=guide,
                        autoguidance_scale=2.0)(x_t, t)
    pred_both = pred_uncond + 4.0 * (pred_cond - pred_uncond) + (pred_cond - pred_guide)
    torch.testing.assert_close(both, x0_of(pred_both))
    assert model.batches == [2 * BATCH] and guide.batches == [BATCH]
    rescaled = cfg_denoiser(ToyModel(), schedule, prediction_type, cond, uncond, 4.0, guidance_rescale=0.7,
                            guide_model=WeakerToyModel(), autoguidance_scale=2.0)(x_t, t)
    torch.testing.assert_close(rescaled, x0_of(rescale_guided(pred_both, pred_cond, 0.7)))
    # the model as its own guide, or autoguidance scale 1, adds nothing to classifier-free guidance
    plain = cfg_denoiser(model, schedule, prediction_type, cond, uncond, 4.0)(x_t, t)
    torch.testing.assert_close(cfg_denoiser(model, schedule, prediction_type, cond, uncond, 4.0, guide_model=model)(
        x_t, t), plain)
    unused = WeakerToyModel()
    assert torch.equal(cfg_denoiser(model, schedule, prediction_type, cond, uncond, 4.0, guide_model=unused,
                                    autoguidance_scale=1.0)(x_t, t), plain)
    # outside the guidance interval neither push applies, and the guide is not called
    outside = WeakerToyModel()
    torch.testing.assert_close(cfg_denoiser(model, schedule, prediction_type, cond, uncond, 4.0,
                                            guidance_interval=(1e6, 1e7), guide_model=outside)(x_t, t),
                               x0_of(pred_cond))
    assert outside.batches == [] and unused.batches == []


def test_shared_negative_prompt_pairs_with_every_sample(inputs):
    x_t, t, cond, uncond = inputs
    schedule = NoiseSchedule(ScheduleConfig())
    negative = uncond[:1]
    x0 = cfg_denoiser(ToyModel(), schedule, "epsilon", cond, negative, 7.5)(x_t, t)
    torch.testing.assert_close(x0, guided_x0(schedule, x_t, t, cond, negative, 7.5, "epsilon"))


def test_guided_denoiser_drives_a_sampler(inputs):
    x_t, _, cond, uncond = inputs
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    denoiser = cfg_denoiser(ToyModel(), schedule, "v_prediction", cond, uncond, 5.0)
    out = sample_ddim(denoiser, schedule, x_t, schedule.sampling_timesteps(4))
    assert out.shape == x_t.shape and torch.isfinite(out).all()


def test_mismatched_inputs_raise_clear_errors(inputs):
    x_t, t, cond, uncond = inputs
    schedule = NoiseSchedule(ScheduleConfig())
    with pytest.raises(ValueError, match="uncond has shape"):
        cfg_denoiser(ToyModel(), schedule, "epsilon", cond, uncond[:, :2], 2.0)
    with pytest.raises(ValueError, match="prediction_type"):
        cfg_denoiser(ToyModel(), schedule, "x0", cond, uncond, 2.0)
    denoiser = cfg_denoiser(ToyModel(), schedule, "epsilon", cond, uncond, 2.0)
    with pytest.raises(ValueError, match="batch"):
        denoiser(x_t[:2], t)


def test_guidance_rescale_matches_the_conditional_spread():
    generator = torch.Generator().manual_seed(1)
    cond = torch.randn(3, 4, 8, 8, generator=generator)
    guided = 3.0 * torch.randn(3, 4, 8, 8, generator=generator) + 0.5
    full = rescale_guided(guided, cond, 1.0)
    assert torch.allclose(full.flatten(1).std(1), cond.flatten(1).std(1), rtol=1e-5)  # per sample
    assert torch.allclose(full / guided, (full / guided)[:, :1, :1, :1].expand_as(full), rtol=1e-5)  # only scaled
    assert torch.equal(rescale_guided(guided, cond, 0.0), guided)
    half = rescale_guided(guided, cond, 0.5)
    assert torch.allclose(half, 0.5 * full + 0.5 * guided, atol=1e-6)


def test_denoiser_applies_the_rescale_only_when_asked(inputs):
    x_t, t, cond, uncond = inputs
    schedule = NoiseSchedule(ScheduleConfig())

    def model(x, t, context):  # guidance changes this prediction's spread, not only its offset
        return x * context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t.float().view(-1, 1, 1, 1) / 1000

    plain = cfg_denoiser(model, schedule, "v_prediction", cond, uncond, 5.0)(x_t, t)
    rescaled = cfg_denoiser(model, schedule, "v_prediction", cond, uncond, 5.0, guidance_rescale=0.7)(x_t, t)
    pred_uncond, pred_cond = model(x_t, batch_of(t), uncond), model(x_t, batch_of(t), cond)
    expected = rescale_guided(pred_uncond + 5.0 * (pred_cond - pred_uncond), pred_cond, 0.7)
    assert torch.allclose(rescaled, schedule.to_x0_eps(expected, x_t, batch_of(t), "v_prediction")[0], atol=1e-5)
    assert not torch.allclose(rescaled, plain)


def test_guidance_scale_table_guides_only_inside_the_sigma_interval():
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    ab = schedule.alphas_cumprod
    sigma = ((1 - ab) / ab).sqrt()  # inf at the last step (alpha_bar = 0)
    table = guidance_scale_table(schedule, 4.0, (0.5, 5.0))
    inside = (sigma > 0.5) & (sigma <= 5.0)
    assert 0 < int(inside.sum()) < schedule.num_steps
    assert torch.equal(table, torch.where(inside, 4.0, 1.0).float())
    assert table[-1] == 1.0 and table[0] == 1.0  # pure noise and the cleanest level stay unguided
    assert torch.equal(guidance_scale_table(schedule, 4.0, (0.0, float("inf"))), torch.full_like(table, 4.0))
    assert torch.equal(guidance_scale_table(schedule, 4.0, None), torch.full_like(table, 4.0))


@pytest.mark.parametrize("interval", [(5.0, 0.5), (-1.0, 2.0), (1.0, 1.0)])
def test_bad_guidance_interval_is_refused(interval):
    with pytest.raises(ValueError, match="sigma_lo < sigma_hi"):
        check_guidance_interval(interval)


def test_guidance_scale_table_takes_the_scale_above_the_interval_above_its_top_only():
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    sigma = schedule.sigmas
    table = guidance_scale_table(schedule, 4.0, (0.5, 5.0), scale_above=2.0)
    inside, above = (sigma > 0.5) & (sigma <= 5.0), sigma > 5.0
    assert int(above.sum()) > 0 and table[-1] == 2.0  # pure noise (sigma inf) is above every finite top
    assert torch.equal(table, torch.where(inside, 4.0, torch.where(above, 2.0, 1.0)).float())
    assert torch.equal(guidance_scale_table(schedule, 4.0, (0.5, 5.0), scale_above=1.0),
                       guidance_scale_table(schedule, 4.0, (0.5, 5.0)))


@pytest.mark.parametrize("interval, scale_above, message", [
    (None, 2.0, "needs an interval with a finite top"),
    ((0.5, float("inf")), 2.0, "needs an interval with a finite top"),
    ((0.5, 5.0), -1.0, "above the interval must be a finite number >= 0"),
    ((0.5, 5.0), float("nan"), "above the interval must be a finite number >= 0"),
    ((0.5, 5.0), float("inf"), "above the interval must be a finite number >= 0")])
def test_bad_scale_above_the_interval_is_refused(interval, scale_above, message):
    with pytest.raises(ValueError, match=message):
        check_guidance_interval(interval, scale_above)
    check_guidance_interval(interval, 1.0)  # the interval itself is fine


def test_levels_lie_above_an_interval_with_a_finite_top_only():  # the rule the sampling sweep's grid keeps too
    assert has_levels_above((0.5, 5.0)) and has_levels_above((0.0, 1e9))
    assert not has_levels_above(None) and not has_levels_above((0.5, float("inf")))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_levels_above_the_interval_are_guided_at_the_scale_above_it(inputs, prediction_type):
    x_t, _, cond, uncond = inputs
    schedule = NoiseSchedule(ScheduleConfig())
    levels = [10, 500, 990]  # sigma about 0.1, 1.0 and 17 on the scaled-linear schedule
    sigma = schedule.sigmas[levels]
    interval = (float(sigma[0]) * 2, float(sigma[1]) * 2)  # the middle level inside, the last above
    model = ToyModel()
    denoiser = cfg_denoiser(model, schedule, prediction_type, cond, uncond, 3.0, guidance_interval=interval,
                            guidance_scale_above=1.5)
    for t, scale in zip(levels, (1.0, 3.0, 1.5)):
        torch.testing.assert_close(denoiser(x_t, t), guided_x0(schedule, x_t, t, cond, uncond, scale, prediction_type))
    assert model.batches == [BATCH, 2 * BATCH, 2 * BATCH]  # below the interval: the conditional batch alone


def test_guidance_edges_are_where_a_steps_scales_change():
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    timesteps = schedule.sampling_timesteps(10)
    sigma = schedule.sigmas[timesteps]
    empty = (float(sigma[5]) * 1.01, float(sigma[4]) * 0.99)  # between two steps' levels: guides no step
    edges = lambda interval, **above: guidance_edges(  # noqa: E731
        step_guidance(schedule, timesteps, 4.0, interval, **above), timesteps)
    assert edges(empty) == []
    assert edges(empty, scale_above=2.0) == [int(timesteps[5])]
    interval = (float(sigma[-2] + sigma[-1]) / 2, float(sigma[3] + sigma[2]) / 2)  # steps 3 to 8
    assert edges(interval, scale_above=2.0) == [int(timesteps[3]), int(timesteps[9])]
    # the interval's own scale above it is the interval widened to the top: the same steps, the same one edge
    assert edges(interval, scale_above=4.0) == edges((interval[0], float("inf"))) == [int(timesteps[9])]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_interval_guides_the_levels_inside_it_and_leaves_the_rest_conditional(inputs, prediction_type):
    x_t, _, cond, uncond = inputs
    schedule = NoiseSchedule(ScheduleConfig())
    levels = [10, 500, 990]  # sigma about 0.1, 1.0 and 17 on the scaled-linear schedule
    sigma = ((1 - schedule.alphas_cumprod[levels]) / schedule.alphas_cumprod[levels]).sqrt()
    interval = (float(sigma[0]) * 2, float(sigma[1]) * 2)  # only the middle level
    model = ToyModel()
    denoiser = cfg_denoiser(model, schedule, prediction_type, cond, uncond, 3.0, guidance_interval=interval)
    for t in levels:
        guided = guided_x0(schedule, x_t, t, cond, uncond, 3.0, prediction_type)
        conditional = guided_x0(schedule, x_t, t, cond, uncond, 1.0, prediction_type)
        assert not torch.allclose(guided, conditional)  # the two answers differ at every level
        torch.testing.assert_close(denoiser(x_t, t), guided if t == 500 else conditional)
    assert model.batches == [BATCH, 2 * BATCH, BATCH]  # outside the interval: the conditional batch alone


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_steps_outside_the_interval_skip_the_unconditional_pass(prediction_type):
    # 10 trailing steps on the zero-terminal-SNR schedule; the interval leaves the first three and the last out
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 4, 8, 8, generator=generator)
    cond = torch.randn(BATCH, LENGTH, WIDTH, generator=generator) + 1.0
    uncond = torch.randn(1, LENGTH, WIDTH, generator=generator) - 1.0
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    timesteps = schedule.sampling_timesteps(10)
    ab = schedule.alphas_cumprod[timesteps]
    sigma = ((1 - ab) / ab).sqrt()
    interval = (float(sigma[-2] + sigma[-1]) / 2, float(sigma[3] + sigma[2]) / 2)
    inside = [interval[0] < float(s) <= interval[1] for s in sigma]
    assert inside == [False] * 3 + [True] * 6 + [False]
    model = ToyModel()
    out = sample_ddim(cfg_denoiser(model, schedule, prediction_type, cond, uncond, 3.0, guidance_interval=interval),
                      schedule, x, timesteps)
    assert model.batches == [2 * BATCH if guided else BATCH for guided in inside]

    def reference(x_t, t):  # both passes at every step, the step's scale applied to every sample
        scale = guidance_scale_table(schedule, 3.0, interval)[t]
        t = batch_of(t)
        pred_cond, pred_uncond = ToyModel()(x_t, t, cond), ToyModel()(x_t, t, uncond.expand_as(cond))
        return schedule.to_x0_eps(pred_uncond + scale * (pred_cond - pred_uncond), x_t, t, prediction_type)[0]

    torch.testing.assert_close(out, sample_ddim(reference, schedule, x, timesteps))
    # where guidance switches on and off: the first guided step and the first after the interval
    assert guidance_edges(step_guidance(schedule, timesteps, 3.0, interval), timesteps) == \
        [int(timesteps[3]), int(timesteps[9])]
    assert guidance_edges(step_guidance(schedule, timesteps, 3.0, None), timesteps) == []


def test_guided_sampling_steps_first_order_at_the_interval_edges_only_when_guided():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, 4, 8, 8, generator=generator)
    cond = torch.randn(BATCH, LENGTH, WIDTH, generator=generator) + 1.0
    uncond = torch.randn(1, LENGTH, WIDTH, generator=generator) - 1.0
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    timesteps, interval = schedule.sampling_timesteps(12), (0.6, 7.5)  # guided from sigma 5.4 to 0.73
    def sample(scale, first_order):  # decoding hands the latents back
        return guided_sample_and_decode(ToyModel(), lambda z: z, schedule, "v_prediction", cond, uncond, scale, x,
                                        timesteps, "dpmpp_2m", PerSampleNoise([0, 1, 2]), guidance_interval=interval,
                                        first_order_at_guidance_edges=first_order)[1]

    edges = guidance_edges(step_guidance(schedule, timesteps, 4.0, interval), timesteps)
    assert len(edges) == 2 and int(timesteps[0]) not in edges  # pure noise is outside, so the first step too
    denoiser = cfg_denoiser(ToyModel(), schedule, "v_prediction", cond, uncond, 4.0, guidance_interval=interval)
    expected = sample_dpmpp_2m(denoiser, schedule, x, timesteps, first_order_at=set(edges))
    torch.testing.assert_close(sample(4.0, True), expected)
    assert not torch.allclose(sample(4.0, False), expected)
    assert torch.equal(sample(1.0, True), sample(1.0, False))  # unguided: one denoiser, no edge


def test_first_order_at_guidance_edges_reaches_the_sampler_from_the_settings():
    from pipelines.text_to_image import GenerationSettings, add_sampling_arguments, sampling_settings

    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    assert not sampling_settings(parser.parse_args([])).first_order_at_guidance_edges
    settings = sampling_settings(parser.parse_args(["--first-order-at-guidance-edges"]))
    assert settings.first_order_at_guidance_edges and "first order at its edges" in settings.describe()
    assert "first order" not in GenerationSettings().describe()


def test_guidance_above_the_interval_reaches_the_settings_and_is_checked_before_any_work():
    from engine.errors import UserError
    from pipelines.text_to_image import GenerationSettings, add_sampling_arguments, sampling_settings

    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    assert sampling_settings(parser.parse_args([])).guidance_scale_above == 1.0
    assert "above it" not in GenerationSettings().describe()
    settings = sampling_settings(parser.parse_args(["--guidance-above", "2"]))
    assert settings.guidance_scale_above == 2.0 and "in sigma (0.28, 7.5], 2 above it" in settings.describe()
    with pytest.raises(UserError, match="needs an interval with a finite top"):
        sampling_settings(parser.parse_args(["--guide-every-level", "--guidance-above", "2"]))


def test_sampling_sweep_reads_guidance_intervals():
    from benchmarks.sampling_sweep import parse_interval

    assert parse_interval("none") is None
    assert parse_interval("0.28,5.42") == (0.28, 5.42)
    with pytest.raises(argparse.ArgumentTypeError, match="'none' or 'SIGMA_LO,SIGMA_HI'"):
        parse_interval("0.28")


def test_sampling_sweep_reads_step_noise_limits():
    from benchmarks.sampling_sweep import noise_settings, parse_sigma_max

    assert parse_sigma_max("none") is None and parse_sigma_max("2.5") == 2.5
    with pytest.raises(argparse.ArgumentTypeError, match="'none' or a noise level"):
        parse_sigma_max("low")
    # eta 0 has no step noise to limit: swept once, not once per limit
    assert noise_settings([0.0, 1.0], [None, 2.5]) == [(0.0, None), (1.0, None), (1.0, 2.5)]


def test_sampling_sweep_keys_settings_by_the_steps_their_bounds_select():
    from benchmarks.sampling_sweep import drawn_alike
    from pipelines.text_to_image import GenerationSettings

    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    key = lambda **changes: drawn_alike(GenerationSettings(steps=25, **changes), schedule)  # noqa: E731
    sigmas = schedule.sigmas[schedule.sampling_timesteps(25)].tolist()
    between = (sigmas[4] + sigmas[5]) / 2, (sigmas[5] + sigmas[6]) / 2  # each bound between two steps' levels
    assert key(guidance_interval=(0.28, between[0])) == key(guidance_interval=(0.28, sigmas[5]))
    assert key(guidance_interval=(0.28, between[0])) != key(guidance_interval=(0.28, between[1]))
    assert key(eta=1.0, eta_sigma_max=between[1]) == key(eta=1.0, eta_sigma_max=sigmas[6])
    assert key(eta=1.0, eta_sigma_max=between[1]) != key(eta=1.0, eta_sigma_max=between[0])
    assert key(eta=1.0, eta_sigma_max=sigmas[-1] / 2) == key(eta=0.0)  # a limit below every step: no step noise
    # unguided (scale 1): the interval selects nothing that matters; anything else still does
    assert key(guidance_scale=1.0, guidance_interval=None) == key(guidance_scale=1.0, guidance_interval=(0.28, 7.5))
    assert key(guidance_rescale=0.0) != key(guidance_rescale=0.7)
    # the scale above the interval: a setting of its own, and its bound read as the steps it selects too
    assert key(guidance_scale_above=2.0) != key() != key(guidance_scale_above=1.5)
    assert key(guidance_interval=(0.28, between[0]), guidance_scale_above=2.0) == \
        key(guidance_interval=(0.28, sigmas[5]), guidance_scale_above=2.0)
    assert key(guidance_interval=(0.28, between[0]), guidance_scale_above=2.0) != \
        key(guidance_interval=(0.28, between[1]), guidance_scale_above=2.0)
    # the interval's own scale above it guides as the interval widened to the top, first-order edges included
    assert key(guidance_interval=(0.28, 7.5), guidance_scale_above=4.0, first_order_at_guidance_edges=True) == \
        key(guidance_interval=(0.28, float("inf")), first_order_at_guidance_edges=True)


class ContextModel:
    """pred = 0.9 x + (the first token's first feature, per sample): unlike ToyModel's context mean, which the
    condition noise's rescale keeps, this sees the noise. Records every call's context."""

    def __init__(self) -> None:
        self.contexts: list[torch.Tensor] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.contexts.append(context.clone())
        return 0.9 * x_t + context[:, 0, 0].view(-1, 1, 1, 1)


def test_condition_noise_table_keeps_the_prompt_below_sigma_lo_and_none_of_it_above_sigma_hi():
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    ab = schedule.alphas_cumprod.double()
    sigma = ((1 - ab) / ab).sqrt()  # inf at the last step
    keep = condition_noise_table(schedule, 1.0, 10.0)
    assert torch.all(keep[sigma <= 1.0] == 1) and torch.all(keep[sigma >= 10.0] == 0) and keep[-1] == 0
    between = (sigma > 1.0) & (sigma < 10.0)
    assert int(between.sum()) > 10
    torch.testing.assert_close(keep[between], (10.0 / sigma[between]).log10())  # linear in log sigma from 1 to 0
    assert torch.all(keep[1:] <= keep[:-1])  # less of the prompt the noisier the level


def test_annealed_condition_keeps_each_samples_mean_and_spread():
    generator = torch.Generator().manual_seed(3)
    cond = torch.randn(BATCH, LENGTH, WIDTH, generator=generator) * torch.tensor([0.5, 1.0, 3.0]).view(-1, 1, 1) + 2
    noise = torch.randn(BATCH, LENGTH, WIDTH, generator=generator)

    def stats(states):
        return states.mean(dim=(1, 2)), states.std(dim=(1, 2))

    for keep in (0.0, 0.3, 0.9):
        out = anneal_condition(cond, keep, 0.25, noise)
        for got, want in zip(stats(out), stats(cond)):
            torch.testing.assert_close(got, want)
        mixed = keep ** 0.5 * cond + 0.25 * (1 - keep) ** 0.5 * noise  # the paper's mix, before the rescale
        torch.testing.assert_close(out, (mixed - stats(mixed)[0].view(-1, 1, 1)) / stats(mixed)[1].view(-1, 1, 1)
                                   * stats(cond)[1].view(-1, 1, 1) + stats(cond)[0].view(-1, 1, 1))
    torch.testing.assert_close(anneal_condition(cond, 1.0, 0.25, noise), cond)
    # none of the prompt kept: the noise alone, at the prompt's mean and spread (the same for a shuffled prompt)
    shuffled = cond.flatten(1)[:, torch.randperm(LENGTH * WIDTH, generator=generator)].view_as(cond)
    torch.testing.assert_close(anneal_condition(shuffled, 0.0, 0.25, noise), anneal_condition(cond, 0.0, 0.25, noise))


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_condition_noise_reaches_the_prompt_branch_above_sigma_lo_only(inputs, guidance_scale):
    x_t, _, cond, uncond = inputs
    schedule = NoiseSchedule(ScheduleConfig())
    levels = [10, 500, 990]  # sigma about 0.1, 1.0 and 17 on the scaled-linear schedule
    sigma = ((1 - schedule.alphas_cumprod[levels]) / schedule.alphas_cumprod[levels]).sqrt()
    annealing = (0.25, float(sigma[0]) * 2, float(sigma[2]) * 2)  # the lowest level keeps the whole prompt
    draws = []

    def noise(like):
        draws.append(like.shape)
        return torch.randn(like.shape, generator=torch.Generator().manual_seed(len(draws)))

    model, plain_model = ContextModel(), ContextModel()
    denoiser = cfg_denoiser(model, schedule, "v_prediction", cond, uncond, guidance_scale,
                            condition_noise=annealing, noise=noise)
    plain = cfg_denoiser(plain_model, schedule, "v_prediction", cond, uncond, guidance_scale)
    for t in levels:
        if t == 10:
            assert torch.equal(denoiser(x_t, t), plain(x_t, t))  # below sigma_lo: the plain denoiser, no draw
        else:
            assert not torch.allclose(denoiser(x_t, t), plain(x_t, t))
    assert draws == [cond.shape, cond.shape]  # one draw per annealed step
    for t, context, plain_context in zip(levels, model.contexts, plain_model.contexts, strict=True):
        annealed = t != 10
        assert torch.equal(context[-BATCH:], plain_context[-BATCH:]) != annealed  # the prompt branch
        if guidance_scale != 1:  # the empty prompt's branch is never noised
            assert torch.equal(context[:BATCH], uncond) and torch.equal(plain_context[:BATCH], uncond)


def test_condition_noise_keeps_each_sample_to_its_own_seed():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    cond = torch.randn(2, LENGTH, WIDTH, generator=generator)
    uncond = torch.zeros(1, LENGTH, WIDTH)
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    timesteps = schedule.sampling_timesteps(6)

    def sample(rows, seeds, condition_noise=(0.5, 1.0, 20.0)):
        denoiser = cfg_denoiser(ContextModel(), schedule, "v_prediction", cond[rows], uncond, 3.0,
                                condition_noise=condition_noise, noise=PerSampleNoise(seeds))
        return sample_dpmpp_2m(denoiser, schedule, x[rows], timesteps)

    pair = sample([0, 1], [7, 8])
    torch.testing.assert_close(sample([1], [8])[0], pair[1])  # sample 1 alone: the same image
    assert not torch.allclose(sample([0, 1], [7, 9])[1], pair[1])  # its seed draws its condition noise
    assert not torch.allclose(sample([0, 1], [7, 8], None), pair)


def test_empty_prompt_row_samples_unconditionally_under_condition_noise_while_a_real_prompt_is_annealed():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(4, 4, 8, 8, generator=generator)
    x[3] = x[1]
    uncond = torch.randn(1, LENGTH, WIDTH, generator=generator)
    prompts = torch.randn(2, LENGTH, WIDTH, generator=generator) + 1.0
    rounded = uncond.to(torch.bfloat16).float()  # the empty prompt as a bf16 encoder may give it in a batch
    cond = torch.cat([prompts[:1], uncond, prompts[1:], rounded])  # rows 1 and 3: the empty prompt
    seeds = [7, 8, 9, 8]  # one seed per row, the same in every batch
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    timesteps = schedule.sampling_timesteps(8)

    def sample(rows, guidance_scale, condition_noise=(0.5, 1.0, 20.0)):
        noise = PerSampleNoise([seeds[row] for row in rows])
        denoiser = cfg_denoiser(ContextModel(), schedule, "v_prediction", cond[rows], uncond, guidance_scale,
                                guidance_rescale=0.7, condition_noise=condition_noise, noise=noise)
        # step noise at every step from the same streams: a condition-noise draw would shift the row's steps
        return sample_dpmpp_2m(denoiser, schedule, x[rows], timesteps, eta=1.0, noise=noise)

    annealed = sample([0, 1, 2, 3], 4.0)
    # the empty prompt: as at guidance 1 without condition noise (alone or in its batch), not guided noise
    torch.testing.assert_close(annealed[1], sample([0, 1, 2, 3], 1.0, None)[1])
    torch.testing.assert_close(annealed[1], sample([1], 1.0, None)[0])
    # rounded states take the unconditional prediction itself: guidance does not amplify the rounding
    torch.testing.assert_close(annealed[3], annealed[1])
    unannealed = sample([0, 1, 2, 3], 4.0, None)
    for row in (0, 2):  # the real prompts beside it are still annealed, each to its own seed
        assert (annealed[row] - unannealed[row]).abs().mean() > 0.01
    torch.testing.assert_close(annealed[[0, 2]], sample([0, 2], 4.0))


def test_unconditional_rows_are_the_rows_of_the_unconditional_states_within_encoder_rounding():
    generator = torch.Generator().manual_seed(6)
    uncond = torch.randn(1, LENGTH, WIDTH, generator=generator)
    prompt = uncond.clone()
    prompt[0, 1:] = torch.randn(LENGTH - 1, WIDTH, generator=generator)  # a prompt: the same start token only
    rounded = uncond.to(torch.bfloat16).float()  # the empty prompt as a bf16 encoder may give it in a batch
    cond = torch.cat([uncond, prompt, rounded, uncond * 1.5])
    assert unconditional_rows(cond, uncond) == [True, False, True, False]
    assert unconditional_rows(cond, uncond.expand_as(cond)) == [True, False, True, False]


@pytest.mark.parametrize("condition_noise", [(0.0, 1.0, 10.0), (0.25, 10.0, 1.0), (0.25, 0.0, 10.0),
                                             (0.25, 1.0, float("inf")), (0.25, 1.0)])
def test_bad_condition_noise_is_refused(condition_noise):
    with pytest.raises(ValueError, match="condition noise must be \\(scale, sigma_lo, sigma_hi\\)"):
        check_condition_noise(condition_noise)


def test_condition_noise_needs_a_noise_source(inputs):
    _, _, cond, uncond = inputs
    with pytest.raises(ValueError, match="condition noise needs a noise source"):
        cfg_denoiser(ToyModel(), NoiseSchedule(ScheduleConfig()), "epsilon", cond, uncond, 3.0,
                     condition_noise=(0.25, 1.0, 10.0))


def test_sampling_sweep_refuses_bad_input_before_looking_for_the_run(tmp_path):
    from benchmarks.sampling_sweep import main, parse_condition_noise
    from engine.errors import UserError
    from engine.stage import StageError

    assert parse_condition_noise("none") is None
    assert parse_condition_noise("0.25,3,15") == (0.25, 3.0, 15.0)
    with pytest.raises(argparse.ArgumentTypeError, match="'none' or 'SCALE,SIGMA_LO,SIGMA_HI'"):
        parse_condition_noise("0.25,3")
    sweep = ["--run", str(tmp_path / "missing"), "--data", str(tmp_path), "--out", str(tmp_path / "sweep.json")]
    with pytest.raises(UserError, match="condition noise must be"):  # refused before the run is looked for
        main(sweep + ["--condition-noise", "none", "0.25,15,3"])
    with pytest.raises(UserError, match="--seed-sets must be at least 1, got 0"):
        main(sweep + ["--seed-sets", "0"])
    with pytest.raises(StageError, match="missing/vae does not exist"):  # ddpm's settings: no step noise unless given
        main(sweep + ["--sampler", "ddpm"])
    with pytest.raises(UserError, match="eta=1.0 applies to the ddim and dpmpp_2m samplers only"):
        main(sweep + ["--sampler", "ddpm", "--eta", "1"])
    with pytest.raises(UserError, match="no setting left to draw"):  # nothing lies above 'none'
        main(sweep + ["--interval", "none", "--guidance-above", "2"])
    (tmp_path / "sweep.json").write_text("{}")  # an earlier sweep: kept unless told
    with pytest.raises(UserError, match=r"sweep.json exists \(an earlier result\); pass another --out, or --overwrite"):
        main(sweep)
    assert (tmp_path / "sweep.json").read_text() == "{}"
    with pytest.raises(StageError, match="missing/vae does not exist"):  # told: on to the run, missing here
        main(sweep + ["--overwrite"])
    with pytest.raises(UserError, match="is a folder; pass a file path"):
        main(sweep[:-1] + [str(tmp_path)])
    with pytest.raises(UserError, match="sweep.json is a file, not a folder; pass another --out"):
        main(sweep[:-1] + [str(tmp_path / "sweep.json" / "inner.json")])
    (tmp_path / "showcase").mkdir()
    (tmp_path / "showcase" / "showcase.md").write_text("an earlier sweep's pictures")
    with pytest.raises(UserError, match="holds an earlier sweep's showcase; pass another --showcase, or --overwrite"):
        main([*sweep[:-1], str(tmp_path / "new.json"), "--showcase", str(tmp_path / "showcase")])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA matter")
def test_sampling_with_an_interval_reads_nothing_back_from_the_device():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, 4, 8, 8, generator=generator).cuda()
    cond = torch.randn(BATCH, LENGTH, WIDTH, generator=generator).cuda()
    uncond = torch.randn(1, LENGTH, WIDTH, generator=generator).cuda()
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    schedule.cache_tables(x.device)  # as the pipelines do: the tables move to the GPU once, before the loop
    model = ToyModel()
    denoiser = cfg_denoiser(model, schedule, "v_prediction", cond, uncond, 3.0, guidance_rescale=0.7,
                            guidance_interval=(0.3, 7.0))
    timesteps = schedule.sampling_timesteps(10)
    per_sample = PerSampleNoise(range(BATCH))  # the pipelines' step noise: drawn on the CPU, copied over
    annealed = cfg_denoiser(model, schedule, "v_prediction", cond, uncond, 3.0, guidance_rescale=0.7,
                            guidance_interval=(0.3, 7.0), condition_noise=(0.25, 3.0, 15.0), noise=per_sample)
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host read or stream sync in the loop raises
    try:
        out = sample_dpmpp_2m(denoiser, schedule, x, timesteps, eta=0.5)
        windowed = sample_dpmpp_2m(denoiser, schedule, x, timesteps, eta=1.0, eta_sigma_max=3.0, noise=per_sample)
        with_condition_noise = sample_dpmpp_2m(annealed, schedule, x, timesteps, eta=1.0, eta_sigma_max=3.0,
                                               noise=per_sample)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert BATCH in model.batches and 2 * BATCH in model.batches and torch.isfinite(out).all()
    assert torch.isfinite(windowed).all() and torch.isfinite(with_condition_noise).all()

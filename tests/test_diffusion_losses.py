"""The UNet training loss: closed forms of the weights, x0 from the cumulative alpha_bar, gradients, learning."""

import pytest
import torch
from torch import nn

from diffusion.losses import (DiffusionLossConfig, DiffusionTrainingModule, diversity_loss, min_snr_weight,
                              x0_weight)
from diffusion.config import PRESETS, UNetTrainConfig
from diffusion.schedule import NoiseSchedule, ScheduleConfig
from engine.config import ConfigError, build_config
from unet import UNet, UNetConfig

SCHEDULE = NoiseSchedule(ScheduleConfig())


class FixedPrediction(nn.Module):
    """Stand-in network that outputs one learnable tensor whatever its input."""

    def __init__(self, pred: torch.Tensor):
        super().__init__()
        self.pred = nn.Parameter(pred.clone())

    def forward(self, x_t, t, context):
        return self.pred


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(UNetConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, head_dim=8, context_dim=12,
                            norm_groups=8))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # wake the zero-initialised layers so gradient reaches every layer
        for p in model.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def fixed_batch(batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 4, 8, 8, generator=g)
    context = torch.randn(batch, 5, 12, generator=g)
    noise = torch.randn(batch, 4, 8, 8, generator=g)
    return x0, context, noise


def test_min_snr_weights_closed_form():
    snr = torch.tensor([0.0, 1.0, 5.0, 10.0])
    assert torch.allclose(min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 1.0, 0.5]))
    assert torch.allclose(min_snr_weight(snr, 5.0, "v_prediction"), torch.tensor([0.0, 0.5, 5 / 6, 5 / 11]))
    # SNR + 1 capped: the plain v-loss (1) up to SNR 4, the same cap above
    plus_one = min_snr_weight(snr, 5.0, "v_prediction", plus_one=True)
    assert torch.allclose(plus_one, torch.tensor([1.0, 1.0, 5 / 6, 5 / 11]))
    assert torch.allclose(x0_weight(snr, 5.0), torch.tensor([0.0, 0.2, 1.0, 1.0]))


@pytest.mark.parametrize("settings", [{"prediction_type": "epsilon", "schedule.zero_terminal_snr": "false"},
                                      {"loss.min_snr_gamma": "0"}])
def test_min_snr_plus_one_needs_v_and_min_snr(settings):
    with pytest.raises(ConfigError, match="min_snr_plus_one caps the v-loss's Min-SNR weight: it needs"):
        build_config(UNetTrainConfig, PRESETS, "tiny", {"loss.min_snr_plus_one": "true", **settings})
    build_config(UNetTrainConfig, PRESETS, "tiny", {"loss.min_snr_plus_one": "true"})  # the default's v: fine


def test_mse_term_matches_hand_computation_with_min_snr():
    x0, context, noise = fixed_batch()
    pred = torch.randn_like(x0)
    t = torch.tensor([5, 200, 600, 999])
    for prediction_type, plus_one in (("epsilon", False), ("v_prediction", False), ("v_prediction", True)):
        module = DiffusionTrainingModule(FixedPrediction(pred), SCHEDULE, prediction_type,
                                         DiffusionLossConfig(min_snr_gamma=5.0, min_snr_plus_one=plus_one))
        loss, logs = module.loss_terms(x0, noise, t, context, step=0)
        ab = SCHEDULE.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        snr = (ab / (1 - ab)).flatten()
        target = noise if prediction_type == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
        capped = (snr + 1).clamp(max=5) if plus_one else snr.clamp(max=5)
        weight = capped / (snr if prediction_type == "epsilon" else snr + 1)
        expected = (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        assert torch.allclose(loss, expected, rtol=1e-5)
        assert set(logs) == {"mse"}  # disabled terms are neither computed nor logged


def test_consistency_uses_cumulative_alpha_bar():
    x0, context, noise = fixed_batch()
    eps_hat = noise + 0.3 * torch.randn_like(noise)
    t = torch.tensor([10, 100, 400, 800])
    cfg = DiffusionLossConfig(min_snr_gamma=0.0, cons_weight=1.0, cons_warmup_steps=0, x0_snr_cap=5.0)
    module = DiffusionTrainingModule(FixedPrediction(eps_hat), SCHEDULE, "epsilon", cfg)
    _, logs = module.loss_terms(x0, noise, t, context, step=0)

    ab = SCHEDULE.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    x0_hat = (x_t - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
    weight = (ab / (1 - ab)).flatten().clamp(max=5.0) / 5.0
    expected = (weight * (x0_hat - x0).pow(2).mean(dim=(1, 2, 3))).mean()
    assert torch.allclose(logs["consistency"].double(), expected, rtol=1e-4)

    # The per-step alpha (1 - beta_t) would give a different, wrong answer.
    alpha = (1 - SCHEDULE.betas[t]).view(-1, 1, 1, 1)
    wrong = ((x_t - (1 - alpha).sqrt() * eps_hat) / alpha.sqrt() - x0).pow(2).mean(dim=(1, 2, 3))
    assert not torch.allclose(logs["consistency"].double(), (weight * wrong).mean(), rtol=1e-2)


def test_consistency_warms_up_linearly():
    x0, context, noise = fixed_batch()
    t = torch.tensor([10, 100, 400, 800])
    cfg = DiffusionLossConfig(min_snr_gamma=0.0, cons_weight=2.0, cons_warmup_steps=100)
    module = DiffusionTrainingModule(FixedPrediction(torch.randn_like(x0)), SCHEDULE, "epsilon", cfg)
    for step, ramp in ((0, 0.0), (25, 0.25), (100, 1.0), (1000, 1.0)):
        loss, logs = module.loss_terms(x0, noise, t, context, step=step)
        assert torch.allclose(loss, logs["mse"] + 2.0 * ramp * logs["consistency"])


def test_diversity_is_zero_for_the_clean_similarity_structure_and_positive_for_collapse():
    x0, _, _ = fixed_batch(batch=5)
    ids = torch.arange(5)
    weight = torch.ones(5)
    scaled = x0 * torch.tensor([0.5, 1.0, 2.0, 3.0, 0.1]).view(-1, 1, 1, 1)  # same cosines as x0
    assert diversity_loss(scaled, x0, ids, weight, margin=0.0) < 1e-6  # rounding only
    assert diversity_loss(scaled, x0, ids, weight, margin=0.05) == 0

    collapsed = x0[:1].expand_as(x0)  # every estimate is the same picture
    clean = torch.nn.functional.normalize(x0.flatten(1), dim=1)
    cos = clean @ clean.T
    off_diagonal = ~torch.eye(5, dtype=torch.bool)
    expected = torch.relu(1 - cos - 0.05)[off_diagonal].mean()
    assert torch.allclose(diversity_loss(collapsed, x0, ids, weight, margin=0.05), expected)

    # Pairs from the same source image (a picture and its mirror) are never compared.
    assert diversity_loss(collapsed, x0, torch.zeros(5, dtype=torch.long), weight, margin=0.0) == 0
    # A pair counts as much as its noisier member: no weight on one sample removes its pairs.
    weight_one_off = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0])
    keep = off_diagonal.clone()
    keep[0, :] = keep[:, 0] = False
    expected_rest = torch.relu(1 - cos - 0.05)[keep].sum() / off_diagonal.sum()
    assert torch.allclose(diversity_loss(collapsed, x0, ids, weight_one_off, margin=0.05), expected_rest)


@pytest.mark.parametrize("term", ["consistency", "diversity"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_each_term_alone_sends_gradient_into_the_unet(term, prediction_type):
    x0, context, noise = fixed_batch()
    t = torch.tensor([3, 30, 60, 90])  # low noise: x0 weights are 1
    with_term = (DiffusionLossConfig(cons_weight=1.0, cons_warmup_steps=0) if term == "consistency"
                 else DiffusionLossConfig(div_weight=1.0, div_margin=-1.0))  # margin -1: every pair active
    grads = []
    for cfg in (DiffusionLossConfig(), with_term):
        model = tiny_unet()
        module = DiffusionTrainingModule(model, SCHEDULE, prediction_type, cfg)
        loss, logs = module.loss_terms(x0, noise, t, context, step=0)
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert logs[term] > 0
    term_grads = {name: grads[1][name] - grads[0][name] for name in grads[0]}
    assert all(torch.isfinite(g).all() for g in term_grads.values())
    for name in ("conv_in.weight", "down.0.layers.0.transformer.blocks.0.cross_attn.kv.weight",
                 "up.0.layers.0.res.conv1.weight", "conv_out.weight"):
        assert term_grads[name].abs().sum() > 0, name


def test_forward_draws_timesteps_and_noise_from_the_batch_generator():
    x0, context, _ = fixed_batch()
    module = DiffusionTrainingModule(tiny_unet(), SCHEDULE, "epsilon",
                                     DiffusionLossConfig(div_weight=0.1, cons_weight=0.1))
    batch = lambda seed: {"latents": x0, "context": context, "generator": torch.Generator().manual_seed(seed)}
    loss_a, logs = module(batch(0), step=10)
    assert set(logs) == {"mse", "consistency", "diversity"}
    assert torch.equal(loss_a, module(batch(0), step=10)[0])
    assert not torch.equal(loss_a, module(batch(1), step=10)[0])


def test_offset_noise_adds_a_per_channel_constant():
    x0 = torch.zeros(64, 4, 8, 8)
    spread = {}
    for offset in (0.0, 1.0):
        module = DiffusionTrainingModule(nn.Identity(), SCHEDULE, "epsilon", DiffusionLossConfig(offset_noise=offset))
        noise = module.draw_noise(x0, torch.Generator().manual_seed(0))
        spread[offset] = noise.mean(dim=(2, 3)).std()  # std of per-(sample, channel) means
    assert spread[0.0] < 0.2 < 0.7 < spread[1.0]  # 1/sqrt(64) = 0.125 vs sqrt(1 + 1/64)


def test_loss_decreases_on_a_fixed_batch():
    x0, context, noise = fixed_batch()
    t = torch.tensor([50, 250, 500, 750])
    cfg = DiffusionLossConfig(div_weight=0.1, cons_weight=0.1, cons_warmup_steps=0)
    module = DiffusionTrainingModule(tiny_unet(), SCHEDULE, "epsilon", cfg)
    optimizer = torch.optim.Adam(module.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        loss, _ = module.loss_terms(x0, noise, t, context, step=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_zero_terminal_snr_keeps_every_term_finite(prediction_type):
    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    x0, context, noise = fixed_batch()
    t = torch.tensor([0, 500, 998, 999])  # alpha_bar is exactly 0 at t = 999
    cfg = DiffusionLossConfig(div_weight=1.0, div_margin=-1.0, cons_weight=1.0, cons_warmup_steps=0)
    model = FixedPrediction(torch.randn_like(x0))
    loss, logs = DiffusionTrainingModule(model, schedule, prediction_type, cfg).loss_terms(x0, noise, t, context, 0)
    loss.backward()
    assert all(torch.isfinite(v) for v in logs.values())
    assert torch.isfinite(model.pred.grad).all()

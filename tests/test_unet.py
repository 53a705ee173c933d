"""The conditional latent UNet: shapes, zero init, input errors, conditioning, checkpointing, save/load."""

import pytest
import torch

from engine.config import ConfigError
from unet import UNet, UNetConfig


def tiny_config(**overrides) -> UNetConfig:
    fields = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, head_dim=8, transformer_depth=1,
                  context_dim=12, norm_groups=8)
    fields.update(overrides)
    return UNetConfig(**fields)


def wake_up(model: UNet, seed: int = 0) -> UNet:
    """Give the zero-initialised output layers small random weights, so every path affects the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def inputs(cfg: UNetConfig, batch: int = 2, size: tuple[int, int] = (8, 8), tokens: int = 5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, *size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, tokens, cfg.context_dim, generator=g)
    return x, t, context


@pytest.mark.parametrize("overrides, size", [
    ({}, (8, 8)),
    ({"channel_mult": (1, 2, 2), "num_res_blocks": 2}, (8, 16)),
    ({"in_channels": 3, "out_channels": 6, "transformer_depth": 2}, (4, 4)),
    ({"channel_mult": (1,)}, (3, 5)),
])
def test_output_shape(overrides, size):
    cfg = tiny_config(**overrides)
    model = wake_up(UNet(cfg))
    x, t, context = inputs(cfg, size=size)
    out = model(x, t, context)
    assert out.shape == (2, cfg.out_channels, *size)
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_initial_output_is_exactly_zero():
    cfg = tiny_config()
    x, t, context = inputs(cfg)
    assert torch.equal(UNet(cfg)(x, t, context), torch.zeros_like(x))


def test_context_width_mismatch_names_both_sizes():
    cfg = tiny_config(context_dim=12)
    x, t, _ = inputs(cfg)
    with pytest.raises(ValueError, match=r"width 20.*context_dim=12.*must match"):
        UNet(cfg)(x, t, torch.randn(2, 5, 20))


def test_size_not_divisible_is_an_error():
    cfg = tiny_config(channel_mult=(1, 2, 2))
    x, t, context = inputs(cfg, size=(6, 8))
    with pytest.raises(ValueError, match="not divisible by 4"):
        UNet(cfg)(x, t, context)


def test_bad_widths_are_config_errors():
    with pytest.raises(ConfigError, match="head_dim"):
        tiny_config(head_dim=12).validate()
    with pytest.raises(ConfigError, match="norm_groups"):
        UNet(tiny_config(norm_groups=5))  # building a model validates its config


def test_output_depends_on_text_and_time_and_accepts_float_or_scalar_t():
    cfg = tiny_config()
    model = wake_up(UNet(cfg)).eval()
    x, t, context = inputs(cfg)
    out = model(x, t, context)
    assert not torch.allclose(out, model(x, t, torch.randn_like(context)))
    assert not torch.allclose(out, model(x, t + 100, context))
    assert torch.allclose(out, model(x, t.float(), context), atol=1e-6)
    scalar = model(x, torch.tensor(7), context)
    assert torch.allclose(scalar, model(x, torch.tensor([7, 7]), context), atol=1e-6)


def test_images_do_not_mix_across_the_batch():
    cfg = tiny_config()
    model = wake_up(UNet(cfg)).eval()
    x, t, context = inputs(cfg, batch=3)
    full = model(x, t, context)
    single = model(x[1:2], t[1:2], context[1:2])
    assert torch.allclose(full[1:2], single, atol=1e-5)


def test_gradient_checkpointing_matches_plain_backward():
    cfg = tiny_config()
    plain = wake_up(UNet(cfg))
    ckpt = UNet(tiny_config(gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t, context = inputs(cfg)
    for model in (plain, ckpt):
        model.train()
        model(x, t, context).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_save_load_round_trip(tmp_path):
    cfg = tiny_config(channel_mult=(1, 2, 2))
    model = wake_up(UNet(cfg)).eval()
    fingerprint = model.save(tmp_path / "unet", training={"lr": 1.0}, trained_on={"data": "abc"},
                             metrics={"val_loss": 0.5})
    loaded = UNet.load(tmp_path / "unet")
    assert loaded.config == cfg and not loaded.training
    x, t, context = inputs(cfg)
    assert torch.equal(model(x, t, context), loaded(x, t, context))
    assert len(fingerprint) == 16

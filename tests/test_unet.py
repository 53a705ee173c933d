"""The conditional latent UNet: shapes, zero init, input errors, conditioning, checkpointing, save/load."""

import json

import pytest
import torch

from engine.config import ConfigError
from unet import UNet, UNetConfig
from unet.blocks import CrossAttention, HeadRMSNorm, SelfAttention


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
    ({"qk_norm": True}, (8, 8)),
    ({"pooled_context": True}, (8, 8)),
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


def test_head_rms_norm_gives_each_head_unit_rms_times_its_gain():
    norm = HeadRMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = 5 * torch.randn(2, 3, 4, 8)  # [B, heads, tokens, head_dim]
    out = norm(x)
    expected = x / x.square().mean(-1, keepdim=True).sqrt() * torch.arange(1.0, 9.0)
    assert torch.allclose(out, expected, atol=1e-5)
    assert norm(x.bfloat16()).dtype == torch.bfloat16  # q, k and v reach attention in one dtype


@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(qk_norm):
    """Growing query/key weights sharpen attention without QK-norm; with it the logits stay bounded."""
    torch.manual_seed(0)
    dim, head_dim = 16, 8
    self_attn, cross_attn = SelfAttention(dim, head_dim, qk_norm), CrossAttention(dim, 12, head_dim, qk_norm)
    x, context = torch.randn(2, 6, dim), torch.randn(2, 5, 12)
    before = self_attn(x), cross_attn(x, context)
    with torch.no_grad():
        self_attn.qkv.weight[: 2 * dim] *= 10  # the query and key rows of the fused projection
        cross_attn.q.weight *= 10
        cross_attn.kv.weight[:dim] *= 10  # the key rows
    after = self_attn(x), cross_attn(x, context)
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-5) == qk_norm


@pytest.mark.parametrize("option", ["qk_norm", "pooled_context"])
def test_an_architecture_option_round_trips(tmp_path, option):
    cfg = tiny_config(**{option: True})
    model = wake_up(UNet(cfg)).eval()  # the zero-initialised layers (pooled_context's output) made non-zero
    with torch.no_grad():  # qk_norm's gains away from their initial ones, so loading them is checked
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 2.0)
    model.save(tmp_path / option, training={}, trained_on={})
    loaded = UNet.load(tmp_path / option)
    x, t, context = inputs(cfg)
    assert getattr(loaded.config, option) and torch.equal(model(x, t, context), loaded(x, t, context))


@pytest.mark.parametrize("option", ["qk_norm", "pooled_context"])
def test_a_folder_saved_before_an_architecture_option_existed_loads_without_it(tmp_path, option):
    old = wake_up(UNet(tiny_config())).eval()
    old.save(tmp_path / "old", training={}, trained_on={})
    config_file = tmp_path / "old" / "config.json"
    saved = json.loads(config_file.read_text())
    assert saved["model"].pop(option) is False
    config_file.write_text(json.dumps(saved))
    loaded = UNet.load(tmp_path / "old")
    x, t, context = inputs(tiny_config())
    assert not getattr(loaded.config, option) and torch.equal(old(x, t, context), loaded(x, t, context))


def test_pooled_context_starts_as_the_same_function_and_then_adds_a_bias_from_the_whole_prompt():
    torch.manual_seed(0)
    plain = UNet(tiny_config())
    torch.manual_seed(0)
    pooled = UNet(tiny_config(pooled_context=True))
    # built last: every other weight is drawn as without it
    extra = set(pooled.state_dict()) - set(plain.state_dict())
    assert extra and all(name.startswith("context_embed.") for name in extra)
    assert all(torch.equal(p, pooled.state_dict()[name]) for name, p in plain.state_dict().items())
    # and its zero output layer adds nothing, whatever the rest has learnt
    missing = pooled.load_state_dict(wake_up(plain).state_dict(), strict=False).missing_keys
    assert set(missing) == extra
    x, t, context = inputs(tiny_config())
    assert torch.equal(plain(x, t, context), pooled(x, t, context))

    with torch.no_grad():
        pooled.context_embed[-1].weight.normal_(0, 0.5)
    # the bias comes from the mean over the prompt's states: their order does not matter (cross-attention has no
    # positions either), and another prompt moves the output by another amount than the plain UNet's
    shuffled = context[:, torch.randperm(context.shape[1])]
    assert torch.allclose(pooled(x, t, context), pooled(x, t, shuffled), atol=1e-5)
    other = torch.randn_like(context)
    added = pooled(x, t, context) - plain(x, t, context)
    added_other = pooled(x, t, other) - plain(x, t, other)
    assert added.abs().max() > 1e-3 and not torch.allclose(added, added_other, atol=1e-4)

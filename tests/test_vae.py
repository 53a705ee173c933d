"""VAE stage: shapes, posterior maths, SSIM, loss behaviour, scaling factor, save/load, input errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.config import ConfigError, build_config
from engine.runlog import read_records
from engine.stage import read_stage
from vae.config import PRESETS, VAEConfig, VAETrainConfig
from vae.discriminator import PatchDiscriminator
from vae.loss import VAELossConfig, VAETrainingModule, adaptive_gan_weight, ssim
from vae.metrics import evaluate_reconstruction, latent_moments, psnr, scaling_factor_of
from vae.model import AutoencoderKL, DiagonalGaussian
from vae import train as vae_train
from vae.train import main



TINY = dict(base_channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=4)


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(VAEConfig(**TINY))


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Flat-coloured rectangles on white, like the training art, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.ones(n, 3, size, size)
    for i in range(n):
        top, left = torch.randint(0, size // 2, (2,), generator=g).tolist()
        x[i, :, top:top + size // 2, left:left + size // 2] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    return x


def test_shapes_factor_8_and_4_latent_channels() -> None:
    vae = tiny_vae()
    assert vae.downsample_factor == 8 and vae.latent_channels == 4
    x = images(2, 64)
    posterior = vae.encode(x)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 8, 8)
    assert posterior.sample().shape == (2, 4, 8, 8)
    assert vae.decode(posterior.mode()).shape == (2, 3, 64, 64)
    # Non-square input works too, as long as both sides are multiples of 8.
    assert vae.decode(vae.encode(torch.zeros(1, 3, 32, 48)).mode()).shape == (1, 3, 32, 48)


def test_full_architecture_maps_512_px_to_4x64x64() -> None:
    vae = AutoencoderKL(VAEConfig())  # the full preset's architecture; only the encoder is run (CPU time)
    with torch.no_grad():
        assert vae.encoder(torch.zeros(1, 3, 512, 512)).shape == (1, 8, 64, 64)


def test_posterior_kl_matches_closed_form() -> None:
    g = torch.Generator().manual_seed(1)
    moments = torch.randn(3, 8, 4, 5, generator=g)
    posterior = DiagonalGaussian(moments)
    mean, logvar = moments.chunk(2, dim=1)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(), expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(DiagonalGaussian(torch.zeros(1, 8, 2, 2)).kl(), torch.zeros(1))


def test_posterior_sample_is_reproducible_and_has_posterior_moments() -> None:
    moments = torch.cat([torch.full((1, 4, 64, 64), 2.0), torch.full((1, 4, 64, 64), math.log(0.25))], dim=1)
    posterior = DiagonalGaussian(moments)
    a = posterior.sample(torch.Generator().manual_seed(5))
    b = posterior.sample(torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(posterior.mode(), posterior.mean)
    assert abs(a.mean().item() - 2.0) < 0.02 and abs(a.std().item() - 0.5) < 0.02


def test_ssim_identity_and_closed_form_for_constant_images() -> None:
    x = images(2, 32)
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    # Constant images have zero variance, so SSIM reduces to the luminance term (2ab + c1) / (a^2 + b^2 + c1), of
    # the intensities in [0, 1] (SSIM's scale: 0.3 and -0.5 in [-1, 1] are 0.65 and 0.25)
    a, b, c1 = 0.65, 0.25, 0.01 ** 2
    value = ssim(torch.full((1, 3, 16, 16), 0.3), torch.full((1, 3, 16, 16), -0.5))
    torch.testing.assert_close(value, torch.tensor([(2 * a * b + c1) / (a * a + b * b + c1)]))
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert (ssim(noisy, x) < 0.9).all()
    # a 1 % brightness error on a textured mid-grey patch is nearly invisible to SSIM; an inverted patch is the
    # opposite of the image (on [-1, 1] scale the luminance term made these 0.53 and +0.26)
    texture = 0.3 * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert ssim(texture + 0.02, texture).item() > 0.99 and ssim(-texture, texture).item() < -0.5


def test_ssim_rejects_images_smaller_than_the_window() -> None:
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_psnr_closed_form() -> None:
    target = torch.zeros(1, 3, 8, 8)
    recon = target + 0.2  # error 0.1 on the [0, 1] scale -> mse 0.01 -> 20 dB
    torch.testing.assert_close(psnr(recon, target), torch.tensor([20.0]))


def test_adaptive_weight_is_the_ratio_of_gradient_norms() -> None:
    last_layer = torch.ones(3, requires_grad=True)
    nll = (2.0 * last_layer).sum()  # gradient norm 2 * sqrt(3)
    g_loss = (0.5 * last_layer).sum()  # gradient norm 0.5 * sqrt(3)
    weight = adaptive_gan_weight(nll, g_loss, last_layer)
    torch.testing.assert_close(weight, torch.tensor(2.0 * math.sqrt(3) / (0.5 * math.sqrt(3) + 1e-4)))
    assert not weight.requires_grad


def make_module(disc_start_step: int, gan: float = 0.5) -> VAETrainingModule:
    torch.manual_seed(0)
    return VAETrainingModule(AutoencoderKL(VAEConfig(**TINY)), PatchDiscriminator(3, 8, 2),
                             VAELossConfig(l1=1.0, ssim=0.2, kl=1e-5, gan=gan, disc_start_step=disc_start_step))


def test_loss_decreases_on_a_fixed_batch() -> None:
    module = make_module(disc_start_step=20)
    optimizer = torch.optim.Adam(module.parameters(), lr=2e-3, betas=(0.5, 0.9))
    batch = images(4, 32)
    l1_history = []
    for step in range(30):
        loss, logs = module(batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        l1_history.append(logs["l1"].item())
        assert logs["disc_on"].item() == float(step >= 20)
    assert logs["gan_weight"].item() > 0 and torch.isfinite(loss)
    assert sum(l1_history[-5:]) / 5 < 0.5 * sum(l1_history[:5]) / 5


def test_adversarial_terms_reach_only_their_own_networks() -> None:
    """The discriminator's gradients do not depend on the generator term; the autoencoder's do."""
    batch = images(2, 32)
    grads = {}
    for gan in (0.0, 0.5):
        module = make_module(disc_start_step=0, gan=gan)
        torch.manual_seed(1)  # same posterior sample in both runs
        loss, _ = module(batch, step=0)
        loss.backward()
        grads[gan] = ([p.grad.clone() for p in module.discriminator.parameters()],
                      module.model.last_layer_weight.grad.clone())
    for without_gan, with_gan in zip(grads[0.0][0], grads[0.5][0]):
        torch.testing.assert_close(without_gan, with_gan)
    assert not torch.allclose(grads[0.0][1], grads[0.5][1])


def test_every_parameter_gets_a_gradient_before_the_gan_starts() -> None:
    """DDP without find_unused_parameters needs every parameter used in every step."""
    module = make_module(disc_start_step=1000)
    loss, _ = module(images(2, 32), step=0)
    loss.backward()
    assert all(p.grad is not None for p in module.parameters())


def test_scaling_factor_gives_unit_std_latents() -> None:
    vae = tiny_vae().eval()
    with torch.no_grad():  # make the raw latents far from unit scale
        vae.encoder.conv_out.weight.mul_(40.0)
    uint8 = ((images(6, 32, seed=3) + 1) * 127.5).round().to(torch.uint8)
    factor = scaling_factor_of(latent_moments(vae, uint8, batch_size=4, device="cpu"))
    with torch.no_grad():
        latents = vae.encode(uint8.float() / 127.5 - 1).sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(factor, 1.0 / latents.std().item(), rtol=2e-3, atol=0)
    assert abs((latents * factor).std().item() - 1.0) < 2e-3


def test_evaluate_reconstruction_reports_metrics() -> None:
    vae = tiny_vae().eval()
    uint8 = ((images(3, 32) + 1) * 127.5).round().to(torch.uint8)
    metrics = evaluate_reconstruction(vae, uint8, batch_size=2, device="cpu")
    assert set(metrics) == {"psnr", "ssim", "kl", "latent_mean", "latent_std"}
    assert all(math.isfinite(v) for v in metrics.values())


def test_save_load_round_trip_gives_identical_outputs(tmp_path) -> None:
    vae = tiny_vae(seed=3).eval()
    vae.config.scaling_factor = 0.42
    x = images(2, 32)
    with torch.no_grad():
        expected = vae.decode(vae.encode(x).mode())
    vae.save(tmp_path / "vae", training={"note": "test"}, trained_on={"data": "abc"}, metrics={"val_psnr": 1.0})
    loaded = AutoencoderKL.load(tmp_path / "vae")
    assert loaded.config == vae.config and loaded.config.channel_mult == (1, 2, 2, 2)
    assert read_stage(tmp_path / "vae", kind="vae").trained_on == {"data": "abc"}
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x).mode()), expected)


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 60, 64), "not a multiple of the downsample factor 8"),
    ((1, 4, 64, 64), r"expects images \[B, 3, H, W\]"),
    ((3, 64, 64), r"expects images \[B, 3, H, W\]"),
])
def test_bad_images_raise_clear_errors(shape, message) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_vae().encode(torch.zeros(shape))


def test_bad_latents_and_config_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"decode expects latents \[B, 4, h, w\]"):
        tiny_vae().decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="not divisible by norm_groups"):
        AutoencoderKL(VAEConfig(base_channels=20, norm_groups=8))


def test_presets_build() -> None:
    tiny = build_config(VAETrainConfig, PRESETS, "tiny")
    full = build_config(VAETrainConfig, PRESETS, "full")
    assert tiny.resolution == 64 and tiny.model.channel_mult == (1, 2, 2, 2)
    assert full.resolution == 512 and full.model.base_channels == 64


def run_cli(out, *extra: str) -> None:
    """The tiny preset shrunk further: 32-px shapes, 16-px crops, 3 steps per epoch."""
    main(["--data", "shapes:20", "--out", str(out), "--preset", "tiny", "--device", "cpu", "--resolution=32",
          "--crop_size=16", "--batch_size=6", "--disc_start_step=4", "--val_batch_size=2", "--warmup_steps=2",
          *extra])


class Killed(Exception):
    pass


def test_training_writes_a_complete_stage_and_resumes_exactly(tmp_path, capsys, monkeypatch) -> None:
    run_cli(tmp_path / "straight", "--epochs=2", "--ema_decay=0.9")
    assert "discriminator switched on for the decoder at step 4" in capsys.readouterr().out

    # Kill the second run in its last epoch's report, before that epoch's checkpoint, then resume it.
    report = vae_train.EpochReport.__call__

    def killed_in_epoch_2(self, epoch, trainer):
        if epoch == 2:
            raise Killed
        return report(self, epoch, trainer)

    monkeypatch.setattr(vae_train.EpochReport, "__call__", killed_in_epoch_2)
    with pytest.raises(Killed):
        run_cli(tmp_path / "resumed", "--epochs=2", "--ema_decay=0.9")
    monkeypatch.setattr(vae_train.EpochReport, "__call__", report)
    assert not (tmp_path / "resumed" / "config.json").exists()
    run_cli(tmp_path / "resumed", "--epochs=2", "--ema_decay=0.9", "--resume")

    folder = tmp_path / "straight"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {"val_psnr", "val_ssim", "latent_std_scaled", "scaling_factor", "minutes"} <= set(metrics)
    assert abs(metrics["latent_std_scaled"] - 1.0) < 0.1
    channel_means, channel_stds = metrics["latent_channel_means_scaled"], metrics["latent_channel_stds_scaled"]
    assert len(channel_means) == len(channel_stds) == 4
    # The channels' second moments average to the whole set's (equal counts per channel).
    second = sum(m * m + s * s for m, s in zip(channel_means, channel_stds)) / 4
    assert second - (sum(channel_means) / 4) ** 2 == pytest.approx(metrics["latent_std_scaled"] ** 2, rel=1e-6)
    vae = AutoencoderKL.load(folder)
    assert vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    # The per-channel moments recorded for a per-channel latent normalisation are the factor's own draw: they
    # combine to the whole set's spread, 1 / scaling_factor.
    means, stds = vae.config.latents_mean, vae.config.latents_std
    assert isinstance(means, tuple) and len(means) == len(stds) == 4
    second = sum(m * m + s * s for m, s in zip(means, stds)) / 4
    assert second - (sum(means) / 4) ** 2 == pytest.approx(vae.config.scaling_factor ** -2, rel=1e-6)
    epochs = [r for r in read_records(folder / "log.jsonl") if r["kind"] == "epoch"]
    assert [r["disc_on"] for r in epochs] == [False, True] and all("val/psnr" in r for r in epochs)
    for name in ("recon_epoch_0002.png", "random_epoch_0002.png"):
        assert (folder / "samples" / name).is_file()

    resumed = AutoencoderKL.load(tmp_path / "resumed")
    for key, value in vae.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)


def test_bad_training_config_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="crop_size=20"):
        run_cli(tmp_path / "bad", "--crop_size=20")


def test_channels_last_gives_the_same_outputs() -> None:
    """The attention block reshapes by strides; NHWC activations (used on CUDA) must not change results."""
    vae = tiny_vae(seed=4).eval()
    with torch.no_grad():  # a non-zero attention output projection, so the attention path matters
        for attn in (vae.encoder.mid.attn, vae.decoder.mid.attn):
            torch.nn.init.normal_(attn.proj.weight, std=0.5)
        x = images(2, 32)
        expected = vae.decode(vae.encode(x).mode())
        vae.to(memory_format=torch.channels_last)
        nhwc = vae.decode(vae.encode(x.contiguous(memory_format=torch.channels_last)).mode())
    torch.testing.assert_close(nhwc, expected, rtol=1e-4, atol=1e-4)


def test_latent_moments_per_channel_match_the_whole_set() -> None:
    """Streamed over uneven batches, the moments equal those of all posterior samples at once, per channel too."""
    vae = tiny_vae().eval()
    uint8 = ((images(5, 32, seed=4) + 1) * 127.5).round().to(torch.uint8)
    moments = latent_moments(vae, uint8, batch_size=2, device="cpu", seed=7)
    with torch.no_grad():
        latents = vae.encode(uint8.float() / 127.5 - 1).sample(torch.Generator().manual_seed(7)).double()
    per_channel = latents.transpose(0, 1).flatten(1)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(as_tensor(moments.channel_means), per_channel.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(as_tensor(moments.channel_stds), per_channel.std(1, correction=0), rtol=1e-4, atol=1e-6)
    assert moments.mean == pytest.approx(latents.mean().item(), abs=1e-6)
    assert moments.std == pytest.approx(latents.std(correction=0).item(), rel=1e-4)
    assert len(moments.channel_means) == vae.config.latent_channels

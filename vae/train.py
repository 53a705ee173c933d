"""Train the VAE stage: ``python -m vae.train --data DIR --out runs/NAME/vae [--preset tiny|full] [--resume]``.

Trains on random crops of the training split, evaluates every epoch on whole validation images, then
measures the latent scaling factor on the training split and writes the stage folder.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from data import CaptionSet, load_captions
from data.augment import random_crop, random_flip, to_float
from engine import Trainer, distributed
from engine.cli import run_stage_cli, stage_parser
from engine.config import config_to_dict, validate_config
from engine.errors import run_cli
from engine.images import save_grid
from vae.config import PRESETS, VAETrainConfig
from vae.discriminator import PatchDiscriminator
from vae.loss import VAELossConfig, VAETrainingModule
from vae.metrics import evaluate_reconstruction, latent_moments, scaling_factor_of
from vae.model import AutoencoderKL


def build_module(cfg: VAETrainConfig) -> VAETrainingModule:
    """Fresh autoencoder + discriminator wrapped with the training objective."""
    model = AutoencoderKL(cfg.model)
    discriminator = PatchDiscriminator(cfg.model.in_channels, cfg.disc_channels, cfg.disc_layers)
    loss = VAELossConfig(l1=cfg.l1_weight, ssim=cfg.ssim_weight, kl=cfg.kl_weight, gan=cfg.gan_weight,
                         disc_start_step=cfg.disc_start_step)
    return VAETrainingModule(model, discriminator, loss)


class BatchMaker:
    """Training batches from uint8 images kept on the device: random crop, random flip, [-1, 1] float."""

    def __init__(self, images_uint8: torch.Tensor, crop_size: int, memory_format: torch.memory_format) -> None:
        self.images = images_uint8
        self.crop_size = crop_size
        self.memory_format = memory_format

    def __call__(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = self.images[indices]
        if self.crop_size:
            batch = random_crop(batch, self.crop_size, generator)
        batch = random_flip(batch, generator)
        return to_float(batch).contiguous(memory_format=self.memory_format)


class EpochReport:
    """Per-epoch callback: full-resolution validation metrics and the two picture grids."""

    def __init__(self, cfg: VAETrainConfig, model: AutoencoderKL, val: CaptionSet, out_dir: Path) -> None:
        self.cfg = cfg
        self.model = model
        self.val = val
        self.samples_dir = out_dir / "samples"

    def __call__(self, epoch: int, trainer: Trainer) -> dict[str, Any]:
        cfg, device = self.cfg, trainer.device
        with trainer.ema_weights():
            metrics = evaluate_reconstruction(self.model, self.val.images, cfg.val_batch_size, device)
            with trainer.autocast():
                self._save_grids(epoch, trainer, metrics["latent_std"])
        gan_on = cfg.gan_weight > 0 and trainer.step > cfg.disc_start_step
        first_step = trainer.step - trainer.steps_per_epoch
        if cfg.gan_weight > 0 and first_step <= cfg.disc_start_step < trainer.step:
            tqdm.write(f"epoch {epoch}: discriminator switched on for the decoder at step {cfg.disc_start_step}")
        tqdm.write(f"epoch {epoch}/{cfg.train.epochs}: val PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, "
                   f"KL {metrics['kl']:.3f}, latent std {metrics['latent_std']:.3f}, "
                   f"discriminator {'on' if gan_on else 'off'}")
        return {**{f"val/{k}": v for k, v in metrics.items()}, "disc_on": gan_on}

    @torch.no_grad()
    def _save_grids(self, epoch: int, trainer: Trainer, latent_std: float) -> None:
        device = trainer.device
        n = min(self.cfg.num_grid_images, len(self.val))
        originals = to_float(self.val.images[:n].to(device))
        # Random latents are N(0, 1) in scaled units: divide by the scaling factor, here still estimated as
        # 1 / std of this epoch's validation latents (the final one is measured on the training set).
        side = self.cfg.resolution // self.model.downsample_factor
        generator = torch.Generator(device).manual_seed(0)  # the same latents every epoch, to compare
        noise = torch.randn(n, self.model.latent_channels, side, side, generator=generator, device=device)
        recon = self.model.decode(self.model.encode(originals).mode())
        random_decodes = self.model.decode(noise * latent_std)
        trainer.log_image("reconstructions", save_grid(torch.cat([originals, recon.float()]),
                                                       self.samples_dir / f"recon_epoch_{epoch:04d}.png", nrow=n,
                                                       max_side=256))
        trainer.log_image("random_decodes", save_grid(random_decodes.float(),
                                                      self.samples_dir / f"random_epoch_{epoch:04d}.png", nrow=n,
                                                      max_side=256))


def train(cfg: VAETrainConfig, data_source: str, out_dir: str | Path, resume: bool = False,
          device: str | torch.device | None = None) -> Path:
    """Train (or resume) the VAE stage into ``out_dir`` and return it once it holds a complete stage folder."""
    started = time.perf_counter()
    validate_config(cfg)
    out_dir = Path(out_dir)
    data = load_captions(data_source, resolution=cfg.resolution)
    train_set, val_set = data.subset("train"), data.subset("val")

    torch.manual_seed(cfg.train.seed)  # the initial weights follow the seed too, not the caller's RNG state
    module = build_module(cfg)
    model = module.model
    param_groups = [{"params": list(model.parameters())},
                    {"params": list(module.discriminator.parameters()), "lr_scale": cfg.disc_lr_scale}]
    # Every parameter takes part in every step (the discriminator learns from step 0), so DDP runs without
    # find_unused_parameters and its per-step graph walk.
    trainer = Trainer(module, cfg.train, out_dir, num_train_items=len(train_set),
                      ema_of=model, param_groups=param_groups, resume=resume, device=device,
                      run_config=config_to_dict(cfg), trained_on={"data": data.fingerprint})
    if distributed.is_main():
        start = cfg.disc_start_step
        if cfg.gan_weight > 0 and start >= trainer.total_steps:
            tqdm.write(f"warning: disc_start_step={start} is not below the {trainer.total_steps} training steps, "
                       "so the adversarial loss never switches on; lower --disc_start_step")
        elif cfg.gan_weight > 0:
            tqdm.write(f"discriminator trains from step 0; its loss reaches the decoder from step {start} "
                       f"of {trainer.total_steps} (epoch {start // trainer.steps_per_epoch + 1})")

    make_batch = BatchMaker(train_set.images.to(trainer.device), cfg.crop_size,
                            trainer.memory_format)
    trainer.fit(make_batch, on_epoch_end=EpochReport(cfg, model, val_set, out_dir))

    def final_metrics() -> dict[str, Any]:
        final = trainer.last_epoch_metrics()  # the last epoch evaluated these same EMA weights
        # One draw of the training posteriors (seed 0) gives the factor and each channel's moments, which a UNet
        # trained with latent_normalisation=per_channel normalises by.
        fit = latent_moments(model, train_set.images, cfg.val_batch_size, trainer.device)
        model.config.scaling_factor = scaling_factor_of(fit)
        model.config.latents_mean, model.config.latents_std = tuple(fit.channel_means), tuple(fit.channel_stds)
        # Another draw of the training posteriors (seed 1) repeats the factor's unit variance only to within the
        # posterior noise, which is tiny at this KL weight; the validation images' scaled std is the real check.
        # The per-channel moments are recorded because the UNet sees them: a channel far from zero mean or unit
        # spread is one the diffusion's noise does not match.
        train_moments = latent_moments(model, train_set.images, cfg.val_batch_size, trainer.device, seed=1)
        val_std = latent_moments(model, val_set.images, cfg.val_batch_size, trainer.device).std
        factor = model.config.scaling_factor
        return {
            "val_psnr": final["val/psnr"], "val_ssim": final["val/ssim"], "val_kl": final["val/kl"],
            "scaling_factor": factor,
            "latent_std_scaled": train_moments.std * factor,
            "val_latent_std_scaled": val_std * factor,
            "latent_channel_means_scaled": [mean * factor for mean in train_moments.channel_means],
            "latent_channel_stds_scaled": [std * factor for std in train_moments.channel_stds],
        }

    def describe(metrics: dict[str, Any]) -> str:
        return (f"val PSNR {metrics['val_psnr']:.2f} dB, SSIM {metrics['val_ssim']:.4f}, scaling factor "
                f"{metrics['scaling_factor']:.5f}, scaled latent std {metrics['latent_std_scaled']:.4f}")

    return trainer.finish_stage(model, cfg, final_metrics, describe, started)


def main(argv: Sequence[str] | None = None) -> None:
    parser = stage_parser("python -m vae.train", "Train the KL autoencoder (VAE) stage.", "vae")
    run_stage_cli(parser, argv, VAETrainConfig, PRESETS, train)


if __name__ == "__main__":
    run_cli(main)

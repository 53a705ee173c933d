"""Configs of the VAE stage: the architecture (saved with the weights) and the training run, plus presets."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import ConfigError, TrainConfig, require_positive


DOWNSAMPLE_PADDINGS = ("symmetric", "bottom_right")


@dataclass
class VAEConfig:
    """Architecture of the KL autoencoder; ``len(channel_mult) - 1`` levels halve the resolution."""

    in_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 1  # per encoder level; the decoder uses one more, as in the LDM autoencoder
    norm_groups: int = 32
    # How the encoder's stride-2 convs pad: "symmetric" (one pixel on every side; every VAE trained before this
    # field) or "bottom_right" (one row and column after the image, as the LDM autoencoder and diffusers'
    # AutoencoderKL, whose encoder only then exports exactly: pipelines.export).
    downsample_padding: str = "symmetric"
    # 1 / std of the unscaled training latents; measured after training, never copied from another model.
    scaling_factor: float | None = None
    # each channel's mean and std of the unscaled training latents, measured with the factor (diffusers'
    # AutoencoderKL names): what a UNet trained with latent_normalisation=per_channel shifts and scales by
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)  # JSON hands back a list
        for name in ("latents_mean", "latents_std"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(getattr(self, name)))

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field and the fix (called when a model is built)."""
        require_positive(self, "in_channels", "latent_channels", "base_channels", "channel_mult", "num_res_blocks",
                         "norm_groups")
        if self.downsample_padding not in DOWNSAMPLE_PADDINGS:
            raise ConfigError(f"VAEConfig: downsample_padding={self.downsample_padding!r}; choose one of "
                              f"{DOWNSAMPLE_PADDINGS}")
        for mult in self.channel_mult:
            if (self.base_channels * mult) % self.norm_groups:
                raise ConfigError(f"VAEConfig: width base_channels*mult = {self.base_channels * mult} is not "
                                  f"divisible by norm_groups={self.norm_groups}; pick base_channels as a multiple "
                                  "of norm_groups")


@dataclass
class VAETrainConfig:
    """One VAE training run: architecture, engine settings, data and loss weights.

    The defaults are the ``full`` preset (one H100): 256-px crops of the 512-px images, batch 16,
    750 * 10 // 16 = 468 steps per epoch, 6 epochs = 2,808 steps (~530 GFLOP per crop and step). Measured
    189 crops/s on one H100 (docs/results/bench/step_speed.json): ~4 minutes of training. Nine epochs gave
    33.3 dB; the three it no longer takes went to the UNet, which decides how the pictures look (issue 13).
    ``disc_start_step`` sits at about half of the run.
    """

    # New VAEs pad like diffusers' AutoencoderKL so the whole model exports exactly; the dataclass default stays
    # "symmetric" so folders saved before the field existed load as they were trained.
    model: VAEConfig = field(default_factory=lambda: VAEConfig(downsample_padding="bottom_right"))
    # beta1 0.9, not the LDM's GAN-style 0.5: reconstruction dominates this objective, and a short CPU A/B at
    # 128 px (beta2 0.9 in both) came out slightly ahead with it (20.8 vs 20.7 dB). No grad clipping: one
    # global norm over the autoencoder and the discriminator together would let either network's spikes
    # throttle the other's updates.
    # Not compiled: the adaptive GAN weight's gradients at the decoder's last layer run the whole compiled
    # backward, and a compiled stage measured 137 crops/s against 187 eager once that term was on.
    # Norms in bf16 (engine.precision): the same PSNR, 0.5 min sooner (docs/BENCHMARKS.md).
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=6, passes_per_epoch=10, batch_size=16, lr=2e-4, warmup_steps=200, weight_decay=0.0, beta1=0.9,
        beta2=0.9, grad_clip=0.0, ema_decay=0.999, log_every=50, low_precision_norms=True))
    resolution: int = 512  # images are loaded, validated and scaled at this size
    crop_size: int = 256  # training sees random crops of this size; 0 trains on whole images
    l1_weight: float = 1.0
    ssim_weight: float = 0.2
    kl_weight: float = 1e-5  # per latent element, next to the per-pixel L1
    gan_weight: float = 0.1  # scales the adaptive weight of the generator's hinge loss; 0 disables it
    disc_start_step: int = 1400  # the generator's adversarial term switches on here (about half of the full run)
    disc_channels: int = 64
    disc_layers: int = 3
    disc_lr_scale: float = 1.0
    val_batch_size: int = 8  # full-resolution evaluation batches (bounded memory at 512 px)
    num_grid_images: int = 6

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field and the fix; ``validate_config`` checks ``model`` first."""
        factor = 2 ** (len(self.model.channel_mult) - 1)
        size = self.crop_size or self.resolution
        if self.resolution % factor or size % factor or size > self.resolution:
            raise ConfigError(f"crop_size={self.crop_size} and resolution={self.resolution} must be multiples of "
                              f"the downsample factor {factor}, with crop_size <= resolution (0: whole images)")
        if size < 11:
            raise ConfigError(f"training images of {size} px are smaller than the 11-px SSIM window; "
                              "raise crop_size (or resolution)")
        require_positive(self, "val_batch_size", "num_grid_images")
        weights = {name: getattr(self, name) for name in ("l1_weight", "ssim_weight", "kl_weight", "gan_weight")}
        if min(weights.values()) < 0:
            raise ConfigError(f"the VAE's loss weights must be >= 0 (0: the term off), got {weights}")


PRESETS: dict[str, dict[str, object]] = {
    "tiny": {  # CPU smoke run: 64-px images, 32-px crops, a few hundred thousand parameters
        "resolution": 64, "crop_size": 32, "model.base_channels": 16, "model.channel_mult": (1, 2, 2, 2),
        "model.norm_groups": 8, "disc_channels": 16, "disc_layers": 2, "epochs": 2, "batch_size": 8,
        "passes_per_epoch": 1, "warmup_steps": 10, "disc_start_step": 20, "log_every": 10, "val_batch_size": 32,
        "num_grid_images": 4, "ema_decay": 0.0,
    },
    "full": {},  # the defaults above
}

"""Configs of the CLIP stage: the architecture (saved with the weights) and the training run, plus presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.config import ConfigError, TrainConfig, require_positive

from .tokenizer import MIN_VOCAB_SIZE


@dataclass
class CLIPConfig:
    """Architecture of the text and image encoders."""

    vocab_size: int = 1024  # asked of the BPE trainer; then set to the trained tokenizer's actual size
    context_length: int = 77
    text_width: int = 256  # = context_dim of the UNet's cross-attention
    text_layers: int = 4
    text_heads: int = 4
    image_size: int = 64  # images of any square size are resized to this inside encode_image
    image_channels: tuple[int, ...] = (32, 64, 128, 256)  # one residual stage per entry, each halving the size
    image_blocks_per_stage: int = 1
    embed_dim: int = 256  # shared text-image space of the contrastive loss
    mlp_ratio: int = 4
    dropout: float = 0.2
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)

    def __post_init__(self) -> None:
        self.image_channels = tuple(self.image_channels)  # JSON hands back a list

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field and the fix (called before anything is built)."""
        require_positive(self, "vocab_size", "text_width", "text_layers", "text_heads", "image_size",
                         "image_channels", "image_blocks_per_stage", "embed_dim", "mlp_ratio")
        if self.vocab_size < MIN_VOCAB_SIZE or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"CLIPConfig: vocab_size must be >= {MIN_VOCAB_SIZE} (every byte and the special "
                              f"tokens) and dropout in [0, 1), got {self.vocab_size} and {self.dropout}")
        if self.text_width % self.text_heads:
            raise ConfigError(f"CLIPConfig: text_width={self.text_width} is not divisible by "
                              f"text_heads={self.text_heads}; pick a divisor")
        if self.context_length < 2:
            raise ConfigError("CLIPConfig: context_length must be >= 2 (start and end tokens)")
        if self.image_size % 8:
            raise ConfigError(f"CLIPConfig: image_size={self.image_size} must be a multiple of 8 (the data loader's "
                              "resolutions)")
        if self.logit_scale_init > self.logit_scale_max:
            raise ConfigError(f"CLIPConfig: logit_scale_init={self.logit_scale_init} is above logit_scale_max="
                              f"{self.logit_scale_max}; start at or below the cap")


@dataclass
class CLIPTrainConfig:
    """One CLIP training run: architecture, engine settings, language mix and augmentation.

    The defaults are the ``full`` preset (one H100): 64-px images, batch 128, an epoch of 10 passes over the
    750 training pairs (7,500 items = 58 steps), 6 epochs = 348 steps: 0.4 minutes on one H100, validation
    text->image R@5 0.386 (en) / 0.386 (zh) at the end of training (docs/results/clip/summary.json).

    Small data calls for strong regularisation. In CPU tuning runs (32 px, validation text->image R@5,
    English/Chinese), a 1,024-token vocabulary beat 2,048 (0.40/0.35 vs 0.28/0.25) and 512 (which truncates
    a third of the Chinese captions); BatchNorm beat GroupNorm in the image encoder; dropout 0.2 with weight
    decay 0.3 beat 0.1 with 0.1. Retrieval plateaus after ~40-60 passes; 120 passes neither helped nor hurt.
    """

    model: CLIPConfig = field(default_factory=CLIPConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=6, passes_per_epoch=10, batch_size=128, lr=1e-3, warmup_steps=100, weight_decay=0.3, beta2=0.98,
        log_every=50))
    zh_prob: float = 0.5  # each step, each image takes its Chinese caption with this probability, else English
    # lowercase and strip accents before BPE: "a pokemon" reads as the captions' "A Pokémon" (docs/results/quality)
    tokenizer_normalize: bool = True
    flip_prob: float = 0.5
    crop_min_scale: float = 0.8  # random-resized crops keep at least this fraction of the side; 1 disables

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field and the fix; ``validate_config`` checks ``model`` first."""
        for name in ("zh_prob", "flip_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} is a probability; use a value in [0, 1]")
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ConfigError(f"crop_min_scale={self.crop_min_scale} must be in (0, 1]; 1 disables cropping")
        if self.train.grad_accum != 1:
            raise ConfigError(f"grad_accum={self.train.grad_accum}: the contrastive loss takes its negatives from one "
                              "micro-batch, so accumulating would shrink them; use grad_accum=1 with a smaller "
                              "batch_size, or more processes (they gather every rank's negatives)")


PRESETS: dict[str, dict[str, object]] = {
    "tiny": {  # CPU smoke run: 32-px images, a few hundred thousand parameters
        "image_size": 32, "vocab_size": 1024, "text_width": 64, "text_layers": 2, "text_heads": 2,
        "image_channels": (16, 32, 64), "embed_dim": 64, "epochs": 2, "batch_size": 32, "passes_per_epoch": 1,
        "warmup_steps": 5, "log_every": 10,
    },
    "full": {},  # the defaults above
}

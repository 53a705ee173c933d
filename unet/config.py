"""Architecture config of the conditional latent UNet."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import UNRECORDED, ConfigError, require_positive


@dataclass
class UNetConfig:
    """Shape of the UNet; saved with the weights so ``UNet.load`` rebuilds the same network.

    Level ``i`` of the encoder/decoder has ``base_channels * channel_mult[i]`` channels and works at
    ``1 / 2**i`` of the input resolution; every level (and the middle) has a spatial transformer.
    """

    in_channels: int = 4
    out_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    head_dim: int = 64  # attention heads per level = channels // head_dim
    # RMS-normalise each head's queries and keys (unet.blocks.HeadRMSNorm) in every attention
    qk_norm: bool = field(default=False, metadata={UNRECORDED: False})  # older stages: as off
    # add an MLP of the text states' mean (over all context positions, padding included: each padding state
    # attends to the prompt) to the timestep embedding, as GLIDE, Imagen and SDXL add a pooled text embedding
    # there: every ResBlock then gets a per-channel bias from the whole prompt, at every resolution and noise
    # level, beside the cross-attention's per-position reading
    pooled_context: bool = field(default=False, metadata={UNRECORDED: False})  # older stages: as off
    transformer_depth: int = 1
    context_dim: int | None = None  # width of the text states; None: the UNet trainer takes the CLIP stage's
    # width of the augmentation label added to the timestep embedding (0: none). Sampling passes zeros.
    augment_dim: int = 0
    norm_groups: int = 32
    dropout: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)  # JSON hands back a list

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field and the fix (called before anything is built)."""
        require_positive(self, "in_channels", "out_channels", "base_channels", "channel_mult", "num_res_blocks",
                         "head_dim", "transformer_depth", "norm_groups")
        if self.context_dim is not None:
            require_positive(self, "context_dim")
        if self.augment_dim < 0 or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"UNetConfig: augment_dim must be >= 0 (0: none) and dropout in [0, 1), got "
                              f"{self.augment_dim} and {self.dropout}")
        for mult in self.channel_mult:
            width = self.base_channels * mult
            if width % self.norm_groups:
                raise ConfigError(f"UNet level width {width} is not divisible by norm_groups={self.norm_groups}; "
                                  "pick base_channels/channel_mult/norm_groups that divide")
            if width % self.head_dim:
                raise ConfigError(f"UNet level width {width} is not divisible by head_dim={self.head_dim}; "
                                  "pick base_channels/channel_mult/head_dim that divide")

    @property
    def downsample_factor(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)

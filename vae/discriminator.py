"""PatchGAN discriminator (pix2pix style): one real/fake logit per overlapping image patch."""

from __future__ import annotations

import math

from torch import Tensor, nn

from engine.precision import GroupNorm


def _norm(channels: int) -> GroupNorm:
    # GroupNorm, not BatchNorm: the logits of a sample never depend on the rest of its (per-GPU) batch.
    return GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """``num_layers`` stride-2 4x4 convs (widths doubling up to 8x), one stride-1 conv, a 1-channel logit conv.

    With 3 layers each logit sees a 70x70 patch, so it judges local texture and edges, not global layout.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2)]
        width = base_channels
        for i in range(1, num_layers + 1):
            next_width = base_channels * min(2 ** i, 8)
            stride = 2 if i < num_layers else 1
            layers += [nn.Conv2d(width, next_width, 4, stride=stride, padding=1, bias=False),
                       _norm(next_width), nn.LeakyReLU(0.2)]
            width = next_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """From-scratch init as in pix2pix: conv weights N(0, 0.02), norm scales 1, biases 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Tensor:
        """Images [B, C, H, W] in [-1, 1] -> patch logits [B, 1, h, w] (positive means "real")."""
        return self.layers(images)

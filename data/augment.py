"""Augmentation on the GPU, applied to whole batches of uint8 or float image tensors.

Every function takes an explicit ``torch.Generator`` (on the images' device) so a training run is
reproducible and resumable. None of them changes colours: captions name colours.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def float_batches(images_uint8: torch.Tensor, batch_size: int, device: torch.device | str) -> Iterator[torch.Tensor]:
    """[-1, 1] float batches on ``device`` from uint8 images [N, C, H, W] (which may stay on the CPU)."""
    for start in range(0, len(images_uint8), batch_size):
        yield to_float(images_uint8[start:start + batch_size].to(device, non_blocking=True))


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``."""
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < p
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_crop(images: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A ``size`` x ``size`` crop at an independent random place in each image."""
    b, _, h, w = images.shape
    if size > min(h, w):
        raise ValueError(f"crop size {size} is larger than the images ({h}x{w})")
    if size == h == w:
        return images
    top = torch.randint(0, h - size + 1, (b,), device=images.device, generator=generator)
    left = torch.randint(0, w - size + 1, (b,), device=images.device, generator=generator)
    offsets = torch.arange(size, device=images.device)
    rows = (top[:, None] + offsets)[:, :, None]  # [B, S, 1]
    cols = (left[:, None] + offsets)[:, None, :]  # [B, 1, S]
    batch = torch.arange(b, device=images.device)[:, None, None]
    return images.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_resized_crop(images: torch.Tensor, size: int, scale: tuple[float, float] = (0.7, 1.0),
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop a random square covering ``scale`` of each image's side, resized (bilinear) to ``size``.

    Works on float images; one batched ``grid_sample`` call.
    """
    b = images.shape[0]
    side = scale[0] + (scale[1] - scale[0]) * torch.rand(b, device=images.device, generator=generator)
    shift = (torch.rand(b, 2, device=images.device, generator=generator) * 2 - 1) * (1 - side)[:, None]
    theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = side
    theta[:, 1, 1] = side
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, (b, images.shape[1], size, size), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float images to ``size`` x ``size`` (area filter when shrinking, bicubic when growing)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    mode = "area" if images.shape[-1] > size else "bicubic"
    return F.interpolate(images, size=(size, size), mode=mode)

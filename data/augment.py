"""Augmentation on the GPU, applied to whole batches of uint8 or float image tensors.

Every function takes an explicit ``torch.Generator`` (on the images' device) so a training run is
reproducible and resumable. Only ``rotate_hue`` changes colours, and its one caller renames the captions'
colour words with it (``diffusion.recolour``): captions name colours.
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


def hsv_hue(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HSV parts of float RGB ``[B, 3, H, W]`` in [0, 1]: hue in degrees [0, 360), value (max) and chroma (max - min),
    each ``[B, H, W]``. A grey pixel (chroma 0) gets hue 0."""
    value, top = rgb.max(dim=1)  # top: the first channel holding the max
    chroma = value - rgb.min(dim=1).values
    r, g, b = rgb.unbind(1)
    safe = chroma.clamp_min(1e-6)
    sextant = torch.where(top == 0, ((g - b) / safe) % 6, torch.where(top == 1, (b - r) / safe + 2, (r - g) / safe + 4))
    return sextant * 60.0, value, chroma


def rotate_hue(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """uint8 images ``[B, 3, H, W]`` with every pixel's HSV hue turned by ``degrees[b]``; saturation and value are
    kept, so white, grey and black pixels (the outlines and the page) stay as they are."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"rotate_hue takes uint8 RGB images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if degrees.shape != (images.shape[0],):
        raise ValueError(f"rotate_hue takes one angle per image: {images.shape[0]}, got {tuple(degrees.shape)}")
    hue, value, chroma = hsv_hue(images.float() / 255.0)
    sextant = ((hue + degrees.to(hue)[:, None, None]) % 360 / 60.0)[:, None]
    # HSV -> RGB: channel n is value - chroma * clamp(min(k, 4 - k), 0, 1) with k = (n + sextant) mod 6
    k = (torch.tensor([5.0, 3.0, 1.0], device=images.device)[None, :, None, None] + sextant) % 6
    out = value[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)
    return out.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


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


# Geometric augmentation with its parameters as a label (the EDM recipe, Karras et al. 2022, sec. 5): the
# UNet is told how each training picture was transformed and is asked for the untransformed distribution
# at sampling by a zero label, so the shrunk, shifted, turned and stretched copies cannot leak into samples.
AUGMENT_LABEL_NAMES = ("log2_scale", "shift_x", "shift_y", "sin_rotation", "cos_rotation_minus_1",
                       "log2_aspect")

AUGMENT_DIM = len(AUGMENT_LABEL_NAMES)  # an all-zero label means "not augmented"


def random_geometry(count: int, max_log2_scale: tuple[float, float], max_shift: float, max_rotation_deg: float,
                    max_log2_aspect: float, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """``count`` random augmentation labels ``[count, 6]``, each parameter uniform in its range.

    ``max_log2_scale = (low, high)`` bounds log2 of the isotropic scale (negative shrinks); shifts are in
    normalised image units (1 = half the side); the rotation is in degrees; the aspect term stretches x by
    ``2**a`` and y by ``2**-a``.
    """
    u = torch.rand(count, 5, generator=generator, device=device)
    low, high = max_log2_scale
    log2_scale = low + (high - low) * u[:, 0]
    shift = (u[:, 1:3] * 2 - 1) * max_shift
    angle = torch.deg2rad((u[:, 3] * 2 - 1) * max_rotation_deg)
    log2_aspect = (u[:, 4] * 2 - 1) * max_log2_aspect
    return torch.stack([log2_scale, shift[:, 0], shift[:, 1], angle.sin(), angle.cos() - 1, log2_aspect], dim=1)


def apply_geometry(images: torch.Tensor, labels: torch.Tensor, fill: float = 1.0) -> torch.Tensor:
    """Transform float images ``[B, C, H, W]`` in [-1, 1] by their labels; uncovered pixels get ``fill`` (white).

    The content is stretched (x by ``2**a``, y by ``2**-a``), scaled by ``2**s``, rotated, then shifted. A zero
    label is the identity (up to the bilinear resampling, which is skipped for such rows).
    """
    if labels.shape != (images.shape[0], AUGMENT_DIM):
        raise ValueError(f"labels must be [B={images.shape[0]}, {AUGMENT_DIM}], got {tuple(labels.shape)}")
    labels = labels.to(images.device, torch.float32)
    log2_scale, shift, sin, cos, log2_aspect = (labels[:, 0], labels[:, 1:3], labels[:, 3], labels[:, 4] + 1,
                                                labels[:, 5])
    sx = torch.exp2(log2_scale + log2_aspect)
    sy = torch.exp2(log2_scale - log2_aspect)
    # forward map p_out = R diag(sx, sy) p_in + shift; affine_grid wants its inverse (output -> input)
    forward = torch.zeros(len(labels), 2, 2, device=images.device)
    forward[:, 0, 0], forward[:, 0, 1] = cos * sx, -sin * sy
    forward[:, 1, 0], forward[:, 1, 1] = sin * sx, cos * sy
    inverse = torch.linalg.inv(forward)
    theta = torch.cat([inverse, -(inverse @ shift[:, :, None])], dim=2)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    # grid_sample pads with zeros: sample (image - fill) and add fill back, so uncovered pixels become fill
    moved = F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    identity = (labels == 0).all(dim=1)
    return torch.where(identity[:, None, None, None], images, moved)

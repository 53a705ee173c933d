"""Image grids for samples and reconstructions."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [0, 255] on the CPU."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] float images [N, 3, H, W] -> PIL images."""
    return [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in to_uint8(images)]


GRID_PADDING = 2  # white pixels around every tile of a saved grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, max_side: int | None = None) -> Path:
    """Save [-1, 1] images [N, 3, H, W] as one PNG grid, ``nrow`` per row.

    ``max_side`` shrinks each tile (so committed grids stay small).
    """
    images = images.detach().float()
    if max_side is not None and images.shape[-1] > max_side:
        images = torch.nn.functional.interpolate(images, size=(max_side, max_side), mode="area")
    grid = make_grid(to_uint8(images), nrow=nrow, padding=GRID_PADDING, pad_value=255)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path

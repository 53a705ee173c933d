"""Image grids for samples and reconstructions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.utils import make_grid

from .errors import UserError


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


def read_grid(path: str | Path, tile: int) -> torch.Tensor:
    """The tiles of a ``save_grid`` picture of ``tile``-px tiles as [-1, 1] images ``[rows, columns, 3, tile, tile]``
    (exact up to the PNG's uint8 rounding): a grid's samples read back, to measure them after the run."""
    if not Path(path).is_file():
        raise UserError(f"no picture at {path}; pass a grid a run wrote (unet/samples/epoch_*.png, nearest_pairs.png)")
    try:
        with Image.open(path) as picture:
            grid = torch.from_numpy(np.array(picture.convert("RGB"))).permute(2, 0, 1)
    except UnidentifiedImageError:
        raise UserError(f"{path} is not a picture; pass a grid a run wrote (unet/samples/epoch_*.png, "
                        "nearest_pairs.png)") from None
    step = tile + GRID_PADDING
    rows, columns = (grid.shape[1] - GRID_PADDING) // step, (grid.shape[2] - GRID_PADDING) // step
    if rows < 1 or columns < 1 or (rows * step + GRID_PADDING, columns * step + GRID_PADDING) != tuple(grid.shape[1:]):
        raise UserError(f"{path} is {grid.shape[2]}x{grid.shape[1]} px: not a grid of {tile}-px tiles with "
                        f"{GRID_PADDING}-px padding; pass a grid a run wrote at that tile size")
    tiles = grid[:, GRID_PADDING:, GRID_PADDING:].unfold(1, tile, step).unfold(2, tile, step)  # [3, rows, cols, t, t]
    return tiles.permute(1, 2, 0, 3, 4).float() / 127.5 - 1

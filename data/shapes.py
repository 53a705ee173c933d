"""A built-in synthetic captions set: coloured shapes on white, any resolution, fully deterministic.

Used by the tests, the demos and the CPU preset, so the whole stack can run without the Pokémon data.
"""

from __future__ import annotations

import torch

COLORS = {  # name: (RGB, Chinese name)
    "red": ((220, 30, 30), "红色"),
    "green": ((30, 170, 60), "绿色"),
    "blue": ((30, 70, 220), "蓝色"),
    "yellow": ((240, 200, 20), "黄色"),
    "purple": ((140, 50, 180), "紫色"),
    "orange": ((245, 130, 20), "橙色"),
}
SHAPES = {"circle": "圆形", "square": "方块", "triangle": "三角形"}


def shape_caption(index: int) -> tuple[str, str, str, str]:
    """(colour, shape, English caption, Chinese caption) of item ``index``."""
    colors, shapes = list(COLORS), list(SHAPES)
    color = colors[index % len(colors)]
    shape = shapes[(index // len(colors)) % len(shapes)]
    article = "an" if color[0] in "aeiou" else "a"
    return color, shape, f"{article} {color} {shape}", f"一个{COLORS[color][1]}的{SHAPES[shape]}"


def render_shape(index: int, resolution: int) -> torch.Tensor:
    """uint8 image [3, R, R] of item ``index``: its shape in its colour, size and place drawn from the index."""
    color, shape, _, _ = shape_caption(index)
    g = torch.Generator().manual_seed(10_007 * index + 17)
    radius = 0.22 + 0.12 * torch.rand((), generator=g).item()  # half-size, as a fraction of the side
    cx, cy = (0.5 + (torch.rand(2, generator=g) - 0.5) * (1.0 - 2.2 * radius)).tolist()
    coords = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = x - cx, y - cy
    if shape == "circle":
        mask = dx.square() + dy.square() <= radius**2
    elif shape == "square":
        mask = (dx.abs() <= radius * 0.85) & (dy.abs() <= radius * 0.85)
    else:  # upward triangle: apex at the top, base at the bottom
        height = (dy + radius) / (2 * radius)  # 0 at the apex, 1 at the base
        mask = (height >= 0) & (height <= 1) & (dx.abs() <= height * radius)
    image = torch.full((3, resolution, resolution), 255, dtype=torch.uint8)
    rgb = torch.tensor(COLORS[color][0], dtype=torch.uint8)
    image[:, mask] = rgb[:, None]
    return image


def make_shapes(count: int, resolution: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """``count`` images [N, 3, R, R] uint8 with their English and Chinese captions."""
    if count < 1:
        raise ValueError(f"the shapes set needs at least one item, got {count}")
    images = torch.stack([render_shape(i, resolution) for i in range(count)])
    captions = [shape_caption(i) for i in range(count)]
    return images, [c[2] for c in captions], [c[3] for c in captions]

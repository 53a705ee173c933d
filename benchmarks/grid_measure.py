"""Composition and pixel near-copies of a UNet run's epoch grids (``unet/samples/epoch_*.png``), read back from the
pictures: how a run's samples moved epoch by epoch, or what a run that stopped before its evaluation had drawn so
far. CPU, no learned weights, the evaluation's own measures (``pipelines.metrics``).

    python -m benchmarks.grid_measure --data ../shared/pokemon --out runs/grids.json \\
        runs/A/unet/lowres/samples/epoch_0020.png runs/A/unet/samples/epoch_0002.png

A grid holds few samples (grid prompts x ``sample_seeds``: 16 by default, at the grids' guidance 5, 128 px a
tile), so its figures are indicative: one near-copy among 16 samples is 6 points. ``pipelines.evaluate`` is the
measurement.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from data import load_captions
from data.augment import to_float
from diffusion.train import GRID_TILE
from engine.cli import add_result_flags, check_output_files, command_line
from engine.errors import add_debug_flag, run_cli
from engine.images import read_grid
from engine.stage import write_json
from pipelines.metrics import COPY_NEIGHBOURS, MEASURE_SIZE, composition, near_copies, thumbnails


def measure(tiles: torch.Tensor, bank: torch.Tensor, unseen: torch.Tensor) -> dict[str, float]:
    """The evaluation's composition and pixel near-copy figures of ``tiles`` ([-1, 1]); ``bank`` holds the training
    images and their mirrors, ``unseen`` the validation images, both at ``MEASURE_SIZE``."""
    copies = near_copies(thumbnails(tiles), thumbnails(bank), thumbnails(unseen), relative_to=COPY_NEIGHBOURS)
    return {"samples": len(tiles), **composition(tiles), "near_copy_share_pixel": copies["share"],
            "near_copy_share_pixel_relative": copies["share_relative"]}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.grid_measure", description=__doc__.split("\n\n")[0])
    add_debug_flag(parser)
    parser.add_argument("grids", nargs="+", type=Path, help="epoch grid PNGs (unet/samples/epoch_*.png)")
    parser.add_argument("--data", required=True, help="the captions folder the run trained on")
    add_result_flags(parser, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    check_output_files(args, "--out")
    tiles = {str(path): read_grid(path, GRID_TILE).flatten(0, 1) for path in args.grids}  # before the data loads
    data = load_captions(args.data, resolution=MEASURE_SIZE)
    train, unseen = to_float(data.subset("train").images), to_float(data.subset("val").images)
    bank = torch.cat([train, train.flip(-1)])
    rows = {}
    for path, images in tiles.items():
        rows[path] = measure(images, bank, unseen)
        print(f"{path}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[path].items() if k != "samples")
              + f" ({len(images)} samples)")
    result = {"data": args.data, "grids": rows, "command": command_line("python -m benchmarks.grid_measure", argv)}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    run_cli(main)

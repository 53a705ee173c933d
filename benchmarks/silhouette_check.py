"""What the silhouette near-copy rule of ``pipelines.evaluate`` flags in committed sample grids (a run's
``final_samples.png``: prompts x seeds, 128-px tiles), beside the pixel rule, and what unseen real images score
under it. For each flagged tile: its nearest training silhouette, and whether that image's English caption names
a butterfly, moth or wings (a yes or no only: no caption leaves the data); and the groups of training images that
share one silhouette under the same threshold (the body plans the set repeats). CPU, seconds; no learned weights.

    python -m benchmarks.silhouette_check --data ../shared/pokemon --out docs/results/quality/silhouette_rule.json \\
        --grid docs/results/quality/default_run5/final_samples.png --grid docs/results/quality/default_run6/... \\
        --pairs docs/results/quality/silhouette_pairs.png

``--pairs``: every flagged tile (grids in order) over its nearest training image or mirror, at 96 px.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from data import load_captions
from engine.cli import add_result_flags, check_output_files, command_line
from engine.errors import add_debug_flag, run_cli
from engine.images import read_grid
from engine.stage import write_json
from pipelines.evaluate import save_pairs
from pipelines.metrics import (MEASURE_SIZE, copy_threshold, held_out_copies, near_copies, nearest_indices, shrunk,
                               silhouette_thumbnails, thumbnails, twin_groups)

WINGED = ("butterfl", "moth", "wing")  # caption words of the set's winged body plan


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.silhouette_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--grid", type=Path, action="append", default=[], help="a run's final_samples.png (repeat)")
    add_result_flags(parser)
    parser.add_argument("--pairs", type=Path, help="a picture of the flagged tiles over their nearest training images")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    check_output_files(args, "--out", "--pairs")
    data = load_captions(args.data)
    train_set = data.subset("train")
    train, val = shrunk(train_set.images), shrunk(data.subset("val").images)
    bank = torch.cat([train, train.flip(-1)])
    outlines, unseen = silhouette_thumbnails(bank), silhouette_thumbnails(val)
    pixels, unseen_pixels = thumbnails(bank), thumbnails(val)
    threshold = copy_threshold(outlines, unseen)
    result = {"data": args.data, "train_images": len(train), "unseen_images": len(val),
              "threshold_rms": threshold, "real_held_out_share": held_out_copies(outlines, unseen)["share"],
              "grids": {}}
    def winged(image: int) -> bool:
        return any(word in train_set.en[image].lower() for word in WINGED)

    groups = twin_groups(outlines, threshold)
    result["training_twin_groups"] = [{"images": len(group), "winged": sum(map(winged, group))} for group in groups]
    print(f"training images sharing a silhouette: {sum(len(g) for g in groups)} in {len(groups)} groups "
          f"{[g['images'] for g in result['training_twin_groups']]}")
    flagged_tiles, partners = [], []
    print(f"unseen real images flagged (held out): {result['real_held_out_share']:.3f}; threshold {threshold:.3f}")
    for path in args.grid:
        tiles = read_grid(path, MEASURE_SIZE)
        rows, seeds = tiles.shape[:2]
        samples = tiles.flatten(0, 1)
        shape = silhouette_thumbnails(samples)
        found = near_copies(shape, outlines, unseen)
        flags, distance = found["copied"], found["distance"]
        pixel_flags = near_copies(thumbnails(samples), pixels, unseen_pixels)["copied"]
        nearest = nearest_indices(shape, outlines)  # a training image or a mirror
        nearest_winged = [winged(i % len(train)) for i in nearest.tolist()]
        flagged_tiles.append(samples[flags])
        partners.append(bank[nearest[flags]])
        result["grids"][str(path)] = {
            "tiles": len(samples), "layout": f"{rows} prompts (rows) x {seeds} seeds (columns), row-major",
            "silhouette_share": float(flags.double().mean()), "pixel_share": float(pixel_flags.double().mean()),
            "flagged": [{"tile": i, "prompt_row": i // seeds, "seed_column": i % seeds,
                         "distance_rms": float(distance[i]), "nearest_training_image_winged": nearest_winged[i]}
                        for i in flags.nonzero().flatten().tolist()],
            "tiles_nearest_a_winged_image": [i for i, w in enumerate(nearest_winged) if w]}
        grid = result["grids"][str(path)]
        print(f"{path}: silhouette {grid['silhouette_share']:.3f} (tiles {[f['tile'] for f in grid['flagged']]}), "
              f"pixel {grid['pixel_share']:.3f}; nearest a winged image: {grid['tiles_nearest_a_winged_image']}")
    if args.pairs and any(len(tiles) for tiles in flagged_tiles):
        save_pairs(torch.cat(flagged_tiles), torch.cat(partners), args.pairs)
    result["command"] = command_line("python -m benchmarks.silhouette_check", argv)
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    run_cli(main)

"""The real images' column of ``pipelines.evaluate`` without a trained run: what the real images themselves score
on every figure of the picture ruler (composition, colour, FD/KID's floor, and the share of unseen images each
near-copy rule counts), for one data source and one judge; a minute on a CPU at 512 px.

    python -m benchmarks.real_reference --data ../shared/pokemon --judge runs/pokemon/judge \\
        --out docs/results/quality/real_reference.json

The near-copy rules flag a sample that lies nearer the training set than 95 % of the validation images do. With
83 validation images that threshold is one draw of an estimated quantile, so the share of unseen images under it
is not 5 % (``pipelines.metrics.held_out_copies`` measures it: each training image against the others). The
pixel figures need no learned weights; the judge-space figure is the given judge's.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from clip.model import CLIPModel
from data import load_captions
from engine.cli import add_result_flags, check_output_files, command_line
from engine.distributed import resolve_device
from engine.errors import add_debug_flag, run_cli
from engine.stage import write_json
from pipelines.evaluate import check_evaluation_data, describe_judge, real_reference
from pipelines.metrics import cosine_nearest


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_reference", description=__doc__.split("\n\n")[0])
    add_debug_flag(parser)
    parser.add_argument("--data", required=True, help="captions source (folder, hub id or 'shapes')")
    parser.add_argument("--judge", type=Path, required=True, help="the CLIP stage folder that judges")
    parser.add_argument("--size", type=int, default=512, help="the generation size the evaluation measures at")
    parser.add_argument("--device", help="where the judge runs (default: GPU when available)")
    add_result_flags(parser)
    args = parser.parse_args(argv)
    check_output_files(args, "--out")
    device = resolve_device(args.device)
    judge = CLIPModel.load(args.judge, device=device).eval()
    data = load_captions(args.data, resolution=args.size)
    train, val = data.subset("train"), data.subset("val")
    check_evaluation_data(val)
    reference = real_reference(judge, train, val, args.size)
    figures = reference.figures
    # an evaluation with this judge reports the same (nn_judge_dist_real_val): a check that it is the same judge
    val_nn = float(cosine_nearest(reference.val_features, reference.judge_bank)[0].mean())
    result = {"figures": figures, "nn_judge_dist_real_val": val_nn, "train_images": len(train),
              "val_images": len(val), "size": args.size,
              "judge": describe_judge(args.judge), "data": args.data,
              "command": command_line("python -m benchmarks.real_reference", argv)}
    for key, value in {**figures, "nn_judge_dist_real_val": val_nn}.items():
        print(f"{key:42s} {value:.4f}")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    run_cli(main)

"""What each pixel near-copy rule of ``pipelines.evaluate`` counts, on pictures made from the training set itself
with a known answer: unseen images, exact copies, washed-out and shifted copies (copies), and blends of five
drawings (bland pictures that copy none). CPU, about a minute; no learned weights.

    python -m benchmarks.copy_rule_check --data ../shared/pokemon --out docs/results/quality/copy_rules.json
"""

from __future__ import annotations

import argparse
from typing import Sequence

import torch

from data import load_captions
from data.augment import to_float
from engine.cli import add_result_flags, check_output_files, command_line
from engine.errors import add_debug_flag, run_cli
from engine.stage import write_json
from pipelines.metrics import COPY_NEIGHBOURS, near_copies, thumbnails

SIZE = 128  # the evaluation measures at 128 px and compares 64-px thumbnails
COUNT = 100  # pictures per kind
SHIFT = 12  # pixels at 128 px (about a tenth of the frame)


def probe_sets(train: torch.Tensor, generator: torch.Generator) -> dict[str, tuple[torch.Tensor, str]]:
    """[-1, 1] pictures of each kind, with what a copy rule should say of them."""
    pick = torch.randint(0, len(train), (COUNT,), generator=generator)
    washed = 1 - 0.35 * (1 - train[pick])  # the drawing at 35 % contrast on its white page
    shifted = torch.roll(train[pick], shifts=(SHIFT, SHIFT), dims=(-2, -1))
    shifted[..., :SHIFT, :] = 1
    shifted[..., :, :SHIFT] = 1
    blends = train[torch.randint(0, len(train), (COUNT, 5), generator=generator)].mean(1)
    return {"exact copies": (train[pick], "copy"), "washed-out copies": (washed, "copy"),
            "shifted copies": (shifted, "copy"), "blends of 5 drawings": (blends, "not a copy")}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.copy_rule_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    add_result_flags(parser)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    check_output_files(args, "--out")
    data = load_captions(args.data, resolution=SIZE)
    train, val = to_float(data.subset("train").images), to_float(data.subset("val").images)
    bank, unseen = thumbnails(torch.cat([train, train.flip(-1)])), thumbnails(val)
    kinds = {"unseen images": (val, "not a copy (about 5 % by construction)"),
             **probe_sets(train, torch.Generator().manual_seed(0))}
    rows = {}
    for name, (pictures, truth) in kinds.items():
        rules = near_copies(thumbnails(pictures), bank, unseen, relative_to=COPY_NEIGHBOURS)
        rows[name] = {"truth": truth, "count": len(pictures), "absolute": rules["share"],
                      "relative": rules["share_relative"]}
        print(f"{name:22s} absolute {rows[name]['absolute']:.2f}  relative {rows[name]['relative']:.2f}  ({truth})")
    result = {"data": args.data, "train_images": len(train), "unseen_images": len(val), "relative_to": COPY_NEIGHBOURS,
              "rows": rows, "command": command_line("python -m benchmarks.copy_rule_check", argv)}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    run_cli(main)

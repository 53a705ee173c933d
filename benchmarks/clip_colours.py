"""Colour zero-shot of one CLIP stage (``pipelines.evaluate.colour_zero_shot``): the training and validation
images whose body colour is a prompt colour, each classified among the six colour prompts by the CLIP's own
embeddings, per language, with each language's confusion matrix (rows: the body's colour, columns: the prompt
taken for it). It tells how well a CLIP stage grounds the colour words the UNet is conditioned on, before any
UNet trains on it: a swapped or retrained CLIP can be screened in seconds, on a CPU too.

    python -m benchmarks.clip_colours --clip runs/pokemon/clip --data ../shared/pokemon --out clip_colours.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import torch

from clip.model import CLIPModel
from data import load_captions
from engine.cli import add_result_flags, check_output_files, command_line
from engine.distributed import resolve_device
from engine.errors import add_debug_flag, run_cli
from engine.stage import read_stage, write_json
from pipelines.evaluate import colour_guesses, zero_shot_shares
from pipelines.metrics import PROMPT_COLOURS


def confusion(labels: torch.Tensor, guesses: torch.Tensor) -> list[list[int]]:
    """``[body colour][prompt taken]`` counts over ``PROMPT_COLOURS``."""
    counts = torch.zeros(len(PROMPT_COLOURS), len(PROMPT_COLOURS), dtype=torch.long)
    counts.index_put_((labels, guesses), torch.ones_like(labels), accumulate=True)
    return counts.tolist()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.clip_colours", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", type=Path, required=True, help="a CLIP stage folder (a run's clip/ or judge/)")
    parser.add_argument("--data", required=True, help="the captions set (image folder, hub id or 'shapes')")
    parser.add_argument("--size", type=int, default=512,
                        help="the size the images are loaded at, where their body colours are measured (the "
                             "UNet stage's and the evaluation's: 512)")
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: GPU when available)")
    add_result_flags(parser)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    check_output_files(args, "--out")
    return measure(args, argv)


def measure(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    device = resolve_device(args.device)
    info = read_stage(args.clip, "clip")  # a clear error for a folder that holds no finished CLIP stage
    data = load_captions(args.data, resolution=args.size)  # checks the folder and size before decoding
    clip = CLIPModel.load(args.clip, device=device).eval()
    result: dict[str, Any] = {"clip": str(args.clip), "fingerprint": info.fingerprint, "data": args.data,
                              "size": args.size, "colours": list(PROMPT_COLOURS)}
    for split in ("train", "val"):
        images = data.subset(split).images
        labels, guesses = colour_guesses(clip, images)
        result[split] = {**zero_shot_shares(labels, guesses),
                         "confusion": {language: confusion(labels, guess) for language, guess in guesses.items()}}
        shares = result[split]
        print(f"{split}: {shares['colour_zero_shot_images']} prompt-coloured bodies; "
              + ", ".join(f"{key.removeprefix('colour_zero_shot_')} {value:.2f}" for key, value in shares.items()
                          if key.startswith("colour_zero_shot_") and key != "colour_zero_shot_images"))
    result["command"] = command_line("python -m benchmarks.clip_colours", argv)
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    run_cli(main)

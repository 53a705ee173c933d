"""Side-by-side comparison of runs: the picture and the table of a swap study.

    python -m pipelines.compare runs/A runs/B --out runs/swap

Every run draws the same prompts with the same seeds (rows = runs, columns = prompts), and the metrics
of each run's ``evaluation.json`` are put in one markdown table; where the evaluations record their samples and
drew the same prompts and seeds, every run after the first is also measured against it sample for sample
(``pipelines.evaluate.paired_differences``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from engine.cli import check_output_file
from engine.errors import UserError, add_debug_flag, run_cli
from engine.images import save_grid

from .evaluate import judge_fingerprint, metrics_table, paired_against, paired_table
from .prompts import SHOWCASE_PROMPTS
from .stages import generation_size, load_stack, sampling_size, stack_infos
from .text_to_image import SIZE_HELP, GenerationSettings, add_sampling_arguments, generate, sampling_settings


def compare_table(runs: Sequence[Path]) -> str:
    """Markdown table: one column per run, one row per metric found in the runs' evaluation.json; then, where
    the evaluations recorded the same samples, each run against the first, sample for sample. Evaluations judged
    by different judges (``judge_fingerprint``) are said to be so, and their judge-space copies are not paired."""
    columns = {}
    for run in runs:
        path = Path(run) / "evaluation.json"
        columns[str(run)] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    judges = {name: judge_fingerprint(evaluation) for name, evaluation in columns.items()}
    first = str(runs[0])
    paired = paired_against(columns[first].get("samples", []),
                            {name: evaluation.get("samples", []) for name, evaluation in list(columns.items())[1:]})
    for name, result in paired.items():
        if judges[name] != judges[first]:  # another ruler: a flag that changed says nothing about the sample
            result.pop("copied_judge", None)
    evaluated = {name: judge for name, judge in judges.items() if columns[name]}  # a run without one: no figures
    note = ""
    if len(set(evaluated.values())) > 1:
        note = ("**Judged by different judges** (" + ", ".join(f"{name}: {judge or 'not named'}"
                                                               for name, judge in evaluated.items())
                + "): the judge-space figures (FD, KID, CLIP score, judge-space near-copies and their real-image "
                "values, feature diversity) do not compare across these columns, and their judge-space copies are "
                "not paired; the pixel, composition and colour figures do compare.\n\n")
    table = metrics_table(columns)
    if paired:
        table += "\n" + paired_table({f"{name} against {first}": result for name, result in paired.items()})
    return note + table


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m pipelines.compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_debug_flag(parser)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for compare.png and compare.md")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier comparison there (default: refuse)")
    parser.add_argument("--prompt", action="append", help="default: a fixed English + Chinese set")
    parser.add_argument("--seed", type=int, default=0)
    add_sampling_arguments(parser)
    parser.add_argument("--size", type=int, help=f"{SIZE_HELP} (default: the first run's UNet's training resolution)")
    parser.add_argument("--tile", type=int, default=128, help="tile size in the committed grid")
    parser.add_argument("--device")
    args = parser.parse_args(argv)
    for name in ("compare.png", "compare.md"):
        check_output_file(args.out / name, "--out", args.overwrite)
    if args.tile < 1:
        raise UserError(f"--tile must be a positive number of pixels, got {args.tile}")
    settings = sampling_settings(args, size=GenerationSettings.size)  # checked before any run loads
    # one size for every run, checked against each before any samples (their config files, not their weights)
    infos = [stack_infos(run) for run in args.runs]
    size = args.size if args.size is not None else generation_size(infos[0])
    for run, info in zip(args.runs, infos):
        try:
            sampling_size(size, info["vae"].model, info["unet"].model, generation_size(infos[0]))
        except UserError as err:
            raise UserError(f"run {run}: {err}") from None
    settings = replace(settings, size=size)

    prompts = args.prompt or list(SHOWCASE_PROMPTS)
    rows = []
    for run in args.runs:
        stack = load_stack(run, device=args.device)
        rows.append(generate(stack, prompts, [args.seed] * len(prompts), settings).cpu())
        del stack
    args.out.mkdir(parents=True, exist_ok=True)
    grid = save_grid(torch.cat(rows), args.out / "compare.png", nrow=len(prompts), max_side=args.tile)
    lines = ["# Comparison", "", f"Rows (top to bottom): {', '.join(str(r) for r in args.runs)}.", "",
             "Columns (prompts, seed " + str(args.seed) + "): " + "; ".join(f"`{p}`" for p in prompts), "",
             f"Sampling: {settings.describe()}.", "",
             "![compare](compare.png)", "", compare_table(args.runs)]
    (args.out / "compare.md").write_text("\n".join(lines), encoding="utf-8")
    print(grid)
    return grid


if __name__ == "__main__":
    run_cli(main)

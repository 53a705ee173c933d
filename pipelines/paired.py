"""Two measurements of the same prompts and seeds, sample for sample, from the JSON files they left.

    python -m pipelines.paired runs/A runs/B                          # each run's evaluation.json
    python -m pipelines.paired runs/A/evaluation.json sweep_B.json:0 --out paired.json

Each side is a run folder (its ``evaluation.json``), an ``evaluation.json``, or a sampling sweep's JSON
(``benchmarks.sampling_sweep``) with ``:N`` for its setting N (default 0). Every side after the first is measured
against the first (``pipelines.evaluate.paired_differences``): each flag's pairs that changed with McNemar's exact
p-value, each mean's paired difference with its standard error beside the unpaired one. Nothing is drawn again and
no weights are read, so two runs trained in different sessions pair from their files alone, as long as each recorded
its samples. Judge-space copies pair only under one judge: where a side does not name the first's judge (another
fingerprint, or none named), that row is left out and the output says so.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Sequence

from engine.cli import add_result_flags, check_output_files
from engine.errors import UserError, add_debug_flag, run_cli
from engine.stage import write_json

from .evaluate import judge_fingerprint, paired_against, paired_table

EVALUATION_FILE = "evaluation.json"


def side_file(spec: str) -> tuple[Path, int | None]:
    """The file a side reads (a run folder's ``evaluation.json``) and the sweep setting it names, if any."""
    match = re.fullmatch(r"(.+?):(\d+)", spec)
    path, setting = (Path(match.group(1)), int(match.group(2))) if match else (Path(spec), None)
    return (path / EVALUATION_FILE if path.is_dir() else path), setting


def check_distinct_sides(specs: Sequence[str]) -> None:
    """Refuse a measurement named twice (``runs/A``, ``runs/A/`` and ``runs/A/evaluation.json`` are one side; a
    sweep's ``SWEEP.json`` is its ``:0``): it would count once, or pair with itself."""
    seen: dict[tuple[Path, int], str] = {}
    for spec in specs:
        path, setting = side_file(spec)
        key = (path.resolve(), setting or 0)
        if key in seen:
            raise UserError(f"{spec} and {seen[key]} are one measurement; name each side once")
        seen[key] = spec


def read_side(spec: str) -> tuple[list[dict[str, Any]], str | None]:
    """The sample records and the judge fingerprint of one side: ``RUN``, ``evaluation.json`` or ``SWEEP.json[:N]``."""
    path, setting = side_file(spec)
    if not path.is_file():
        raise UserError(f"{path} not found: give a run folder holding {EVALUATION_FILE}, an {EVALUATION_FILE} file, "
                        "or a sampling sweep's JSON (SWEEP.json:N for its setting N)")
    try:
        measured = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not JSON ({err}): give an {EVALUATION_FILE} or a sampling sweep's JSON") from None
    if not isinstance(measured, dict) or not ("records" in measured or "generation" in measured):
        raise UserError(f"{path} is neither an {EVALUATION_FILE} nor a sampling sweep's JSON: give one of those")
    judge = judge_fingerprint(measured)
    if "records" in measured:  # a sampling sweep
        records = measured["records"]
        setting = 0 if setting is None else setting
        if setting >= len(records):
            raise UserError(f"{path} has settings 0-{len(records) - 1}, not {setting}: pick one with :N")
        record = records[setting]
        if "same_samples_as" in record:  # drew nothing of its own: its samples are the earlier setting's
            record = records[record["same_samples_as"]]
        samples = record.get("samples")
    else:
        if setting is not None:
            raise UserError(f"{path} is an evaluation, which has one setting: drop ':{setting}'")
        samples = measured.get("samples")
    if not samples:
        raise UserError(f"{spec} records no samples (written before evaluations and sweeps kept each sample's "
                        "verdicts): measure it again, or pair from pictures with benchmarks.colour_breakdown "
                        "--paired-with")
    return samples, judge


def paired_sides(specs: Sequence[str]) -> dict[str, Any]:
    """Every side after the first against the first (``paired_differences``), judge-space copies only where both
    sides name one judge; ``left_out`` says which sides shared too few samples with the first to pair."""
    if len(specs) < 2:
        raise UserError("give at least two sides to pair: the first, and each to measure against it")
    check_distinct_sides(specs)
    sides = {spec: read_side(spec) for spec in specs}
    (first, (reference, first_judge)), *others = sides.items()
    paired = paired_against(reference, {spec: samples for spec, (samples, _) in others})
    if not paired:
        raise UserError(f"no side shares two samples (source, prompt or row, and seed) with {first}: pair "
                        "measurements made with the same prompts and seeds")
    other_judges = []
    for spec, result in paired.items():
        judge = sides[spec][1]
        if judge is None or judge != first_judge:  # another ruler, or one not named: the flag says nothing
            result.pop("copied_judge", None)
            other_judges.append(spec)
    return {"first": first, "judges": {spec: judge for spec, (_, judge) in sides.items()}, "paired": paired,
            "judge_copies_not_paired": other_judges,
            "left_out": [spec for spec, _ in others if spec not in paired]}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m pipelines.paired", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_debug_flag(parser)
    parser.add_argument("sides", nargs="+", metavar="SIDE",
                        help="RUN, evaluation.json or SWEEP.json[:N]; the others are measured against the first")
    add_result_flags(parser, help="write the paired figures here as JSON")
    args = parser.parse_args(argv)
    check_output_files(args, "--out")
    result = paired_sides(args.sides)
    print(paired_table({f"{spec} against {result['first']}": figures for spec, figures in result["paired"].items()}),
          end="")
    for spec in result["judge_copies_not_paired"]:
        print(f"{spec}: judge-space copies not paired (judge {result['judges'][spec] or 'not named'}, "
              f"the first's {result['judges'][result['first']] or 'not named'})")
    for spec in result["left_out"]:
        print(f"{spec}: fewer than two samples drawn with the first's prompts and seeds; not paired")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    run_cli(main)

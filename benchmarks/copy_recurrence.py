"""Do the same samples come out as near-copies run after run? Several measurements of the same prompts and seeds
under one judge (each a run folder, an ``evaluation.json`` or a sweep's ``SWEEP.json:N``, as ``pipelines.paired``
reads them), each sample's copy flag counted over them. CPU, from the files alone.

    python -m benchmarks.copy_recurrence docs/results/quality/recolour_run docs/results/quality/unet_seed1_run ... \\
        --recurring 3 --out docs/results/quality/copy_recurrence_h100.json

If each run drew its copies from its samples at random, at its own rate, the number of runs that copy one sample
would follow a Poisson-binomial law; the output sets the observed count of samples copied by k runs beside that
law's expectation (exact, not simulated), and lists the samples copied by at least ``--recurring`` runs: where
copying is carried by a prompt and a seed (a noise that leads to a training image whatever the UNet) rather than
spread over the samples.
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any, Sequence

from engine.cli import add_result_flags, check_output_files, command_line
from engine.errors import UserError, add_debug_flag, run_cli
from engine.stage import write_json
from pipelines.evaluate import PAIRED_FLAGS, sample_key
from pipelines.paired import check_distinct_sides, read_side


def poisson_binomial(rates: Sequence[float]) -> list[float]:
    """P(k of the events happen), k = 0..len(rates), for independent events of the given probabilities."""
    law = [1.0]
    for rate in rates:
        law = [(law[k] if k < len(law) else 0.0) * (1 - rate) + (law[k - 1] * rate if k else 0.0)
               for k in range(len(law) + 1)]
    return law


def recurrence(sides: dict[str, list[dict[str, Any]]], flag: str, recurring: int) -> dict[str, Any]:
    """Over the samples every side drew: how many sides flag each one, against independence at each side's rate."""
    flagged = {name: {sample_key(r): bool(r[flag]) for r in records if r.get(flag) is not None}
               for name, records in sides.items()}
    # each sample as its records name it (a colour prompt, or a caption's validation row: no caption text)
    drawn = {sample_key(r): {k: r[k] for k in ("source", "prompt", "row", "seed") if k in r}
             for records in sides.values() for r in records}
    common = set.intersection(*(set(flags) for flags in flagged.values()))
    if len(common) < 2:
        raise UserError(f"the sides share {len(common)} sample(s) with a {flag} verdict: give measurements of the "
                        "same prompts and seeds")
    keys = sorted(common, key=str)
    rates = {name: sum(flags[k] for k in keys) / len(keys) for name, flags in flagged.items()}
    per_sample = {k: sum(flags[k] for flags in flagged.values()) for k in keys}
    observed = Counter(per_sample.values())
    expected = [p * len(keys) for p in poisson_binomial(list(rates.values()))]
    repeat = sorted((k for k, n in per_sample.items() if n >= recurring), key=lambda k: (-per_sample[k], str(k)))
    flags_total = sum(per_sample.values())
    return {"flag": flag, "sides": len(sides), "samples": len(keys), "rates": rates,
            "samples_flagged_by": {str(n): {"observed": observed.get(n, 0), "expected_if_independent": expected[n]}
                                   for n in range(len(sides) + 1)},
            "recurring": recurring,
            "recurring_samples": [{**drawn[k], "sides": per_sample[k]} for k in repeat],
            "recurring_expected_if_independent": sum(expected[recurring:]),
            "share_of_flags_on_recurring_samples": sum(per_sample[k] for k in repeat) / max(flags_total, 1),
            "recurring_by_source": dict(Counter(k[0] for k in repeat))}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.copy_recurrence", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_debug_flag(parser)
    parser.add_argument("sides", nargs="+", metavar="SIDE", help="RUN, evaluation.json or SWEEP.json[:N]")
    parser.add_argument("--flag", choices=[flag for flag in PAIRED_FLAGS if flag.startswith("copied")],
                        default="copied_judge")
    parser.add_argument("--recurring", type=int, default=2, help="list the samples flagged by at least this many")
    add_result_flags(parser)
    args = parser.parse_args(argv)
    check_output_files(args, "--out")
    if len(args.sides) < 2 or not 1 <= args.recurring <= len(args.sides):
        raise UserError(f"give at least two sides and --recurring between 1 and their number ({len(args.sides)}), "
                        f"got {len(args.sides)} side(s) and --recurring {args.recurring}")
    check_distinct_sides(args.sides)
    read = {spec: read_side(spec) for spec in args.sides}
    if args.flag == "copied_judge":  # a flag of one judge says nothing under another
        judges = {judge for _, judge in read.values()}
        if len(judges) > 1 or None in judges:
            raise UserError("judge-space copies count only under one named judge; these sides name "
                            f"{sorted(map(str, judges))}: give measurements of one judge, or --flag copied_pixel")
    result = recurrence({spec: samples for spec, (samples, _) in read.items()}, args.flag, args.recurring)
    result["judges"] = {spec: judge for spec, (_, judge) in read.items()}
    result["command"] = command_line("python -m benchmarks.copy_recurrence", argv)
    for n, row in result["samples_flagged_by"].items():
        print(f"flagged by {n} of {result['sides']}: {row['observed']} samples "
              f"(independent: {row['expected_if_independent']:.1f})")
    print(f"{len(result['recurring_samples'])} samples flagged by at least {args.recurring} "
          f"(independent: {result['recurring_expected_if_independent']:.1f}) carry "
          f"{result['share_of_flags_on_recurring_samples']:.0%} of the flags; by source: {result['recurring_by_source']}")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    run_cli(main)

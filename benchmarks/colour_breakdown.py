"""Colour adherence per prompt colour: for the colour-prompt samples of an evaluation, read back from its
``nearest_pairs.png``, and for the real images whose captions name a colour. It tells the colours a model gets
wrong from the colours the hue ruler itself misjudges, and shows what the captions use each colour word for
(a body or a detail), and how many training images have a body of each colour (the UNet's colour
sentences) with ``--recolour-copies K`` recoloured copies of each (``diffusion.recolour``). CPU, no learned weights.

    python -m benchmarks.colour_breakdown --pairs docs/results/quality/default_run/nearest_pairs.png \\
        --data ../shared/pokemon --out docs/results/quality/colour_breakdown.json [--recolour-copies 2] \\
        [--paired-with docs/results/quality/default_run/step_noise/nearest_pairs.png]

Evaluations record the samples' per-colour figures themselves (``colour_adherence_<colour>``); this reads them
back from the picture of one made before they did. The picture holds the samples at 96 px, not at the 512 px
the evaluation measured, so its overall figure is printed beside for a check against the evaluation's.
``--paired-with`` reads a second evaluation's picture of the same prompts and seeds and compares the two sample
for sample (``pipelines.evaluate.paired_differences``: the colour hits and the parts at the picture's size), the
only way to pair evaluations made before they recorded their samples.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Sequence

import torch

from data import load_captions
from data.augment import to_float
from diffusion.colour_sentences import body_colours, recoloured_copies
from diffusion.recolour import RecolourAugment
from engine.cli import add_result_flags, check_output_files, command_line
from engine.config import validate_config
from engine.errors import UserError, add_debug_flag, run_cli
from engine.images import read_grid
from engine.stage import write_json
from pipelines.evaluate import PAIRS_COLUMNS, PAIRS_TILE, paired_differences, paired_table
from pipelines.metrics import (FAMILY_NAMES, PROMPT_COLOURS, at_prompt_mix, colour_hits,
                               colour_hits_from_counts, colour_prompts, composition_per_image, composition_records,
                               first_named_colours, hue_family_counts, share_by_colour)

COLOUR_SEEDS = 8  # pipelines.evaluate's default: 6 colours x 2 languages x 8 seeds = 96 colour-prompt samples
# What an English colour word describes, from the word after it ("red eyes" vs "red body"): a rough reading of
# the captions, to tell whether a colour word names a creature's body or one of its details in this data.
DETAIL_NOUNS = frozenset("eyes eye pupils nose cheeks mouth tongue beak orb orbs gem gems jewel spots stripes "
                         "markings accents patches tips claws horn horns feet hands crest".split())
BODY_NOUNS = frozenset("body fur skin feathers scales shell pokémon creature bird dragon".split())


def pair_samples(path: str | Path, count: int, columns: int = PAIRS_COLUMNS, tile: int = PAIRS_TILE) -> torch.Tensor:
    """The first ``count`` samples of a ``save_pairs`` picture as [-1, 1] images ``[count, 3, tile, tile]``
    (sample rows alternate with rows of their nearest training images)."""
    if not Path(path).is_file():
        raise UserError(f"no picture at {path}; pass the nearest_pairs.png an evaluation wrote")
    grid = read_grid(path, tile)
    if grid.shape[1] != columns or grid.shape[0] < 2 * -(-count // columns):
        raise UserError(f"{path} holds {grid.shape[0]} rows of {grid.shape[1]} tiles at {tile} px: too small for "
                        f"{count} samples in rows of {columns}; pass the nearest_pairs.png of an evaluation")
    return grid[0::2].flatten(0, 1)[:count]


def summary(images: torch.Tensor, named: list[str], chinese: torch.Tensor | None = None) -> dict:
    """Adherence overall, per named colour (and per language, given which prompts are Chinese), and per named
    colour the mean share of the foreground's chromatic pixels in each hue family (what the pictures show
    instead, where they miss), and the mean share of the foreground with a hue (low for pale or grey pictures)."""
    counts, foreground = hue_family_counts(images)
    shares = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    hits = colour_hits_from_counts(counts, foreground, named).float()
    rows = {colour: [i for i, n in enumerate(named) if n == colour] for colour in dict.fromkeys(named)}
    hue_shares = {colour: dict(zip(FAMILY_NAMES, shares[index].mean(0).tolist())) for colour, index in rows.items()}
    figures = {"count": len(named), "overall": float(hits.mean()), "by_colour": share_by_colour(hits, named),
               # the hue families cover every hue: their counts add up to the chromatic pixels
               "chromatic_share": float((counts.sum(dim=1) / foreground.clamp_min(1)).mean()),
               "hue_shares": hue_shares}
    if chinese is not None:
        figures["en"], figures["zh"] = float(hits[~chinese].mean()), float(hits[chinese].mean())
    return figures


def colour_prompt_records(images: torch.Tensor, texts: Sequence[str], seeds: Sequence[int],
                          named: list[str]) -> list[dict]:
    """Sample records (``pipelines.evaluate.generation_metrics``' kind) of colour-prompt samples read back from a
    picture: each one's colour hit, parts, foreground share, chromatic share and frame filling, without copy flags (a
    picture holds no threshold)."""
    hits, composed = colour_hits(images, named).tolist(), composition_records(composition_per_image(images))
    return [{"source": "colour_prompts", "prompt": text, "seed": seed, **figures, "colour_hit": hit}
            for text, seed, hit, figures in zip(texts, seeds, hits, composed, strict=True)]


def body_counts(images: torch.Tensor) -> dict[str, int]:
    """How many of ``images`` (uint8) have a body of each colour family, as the colour sentences name it."""
    bodies = body_colours(images)
    return {family: bodies.count(index) for index, family in enumerate(FAMILY_NAMES)}


def colour_word_use(captions: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per prompt colour: its mentions in English ``captions``, and the share of them followed by a detail noun
    or a body noun (``red eyes``, ``red and white body``)."""
    use = {}
    for colour in PROMPT_COLOURS:
        following = [m.group(1) for caption in captions
                     for m in re.finditer(rf"\b{colour}\b[\s-]*(?:and[\s-]+\w+[\s-]+)?(\w+)", caption.lower())]
        use[colour] = {"mentions": len(following),
                       "detail_share": sum(w in DETAIL_NOUNS for w in following) / max(len(following), 1),
                       "body_share": sum(w in BODY_NOUNS for w in following) / max(len(following), 1)}
    return use


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.colour_breakdown", description=__doc__.split("\n\n")[0])
    add_debug_flag(parser)
    parser.add_argument("--pairs", type=Path, required=True, help="an evaluation's nearest_pairs.png")
    parser.add_argument("--data", required=True, help="the captions set, for the real images")
    parser.add_argument("--size", type=int, default=512, help="the real images' size (the evaluation's)")
    parser.add_argument("--recolour-copies", type=int, default=0,
                        help="also count the bodies of this many recoloured copies per training image (seed 0)")
    parser.add_argument("--paired-with", type=Path,
                        help="another evaluation's nearest_pairs.png of the same prompts and seeds (another setting "
                             "or model): its colour-prompt samples against these, sample for sample")
    add_result_flags(parser)
    args = parser.parse_args(argv)
    check_output_files(args, "--out")
    recolour = validate_config(RecolourAugment(copies=args.recolour_copies))  # a bad count fails before any work
    texts, seeds, named = colour_prompts(COLOUR_SEEDS)
    chinese = torch.tensor([not text.isascii() for text in texts])
    samples = pair_samples(args.pairs, len(named))
    result: dict = {"pairs": str(args.pairs), "samples": summary(samples, named, chinese)}
    if args.paired_with:
        other = pair_samples(args.paired_with, len(named))
        result["paired_with"] = {"pairs": str(args.paired_with), "samples": summary(other, named, chinese),
                                 "paired": paired_differences(colour_prompt_records(samples, texts, seeds, named),
                                                              colour_prompt_records(other, texts, seeds, named))}

    data = load_captions(args.data, resolution=args.size)
    train, val = data.subset("train"), data.subset("val")
    images = to_float(torch.cat([train.images, val.images]))
    first_named = first_named_colours(train.en + val.en)
    real_named = [name for _, name in first_named]
    result["real"] = summary(images[[i for i, _ in first_named]], real_named)
    # the samples' mix: the colour prompts name each colour alike, the captions mostly blue
    result["real"]["at_prompt_mix"] = at_prompt_mix(result["real"]["by_colour"], named)
    result["caption_use"] = colour_word_use(train.en + val.en)
    # what the UNet learns each colour from: training images whose body colour sentence names it
    result["training_bodies"] = body_counts(train.images)
    result["training_images"] = len(train)
    if recolour.copies:  # what --unet.recolour.copies=K adds: the recoloured bodies, as their sentences name them
        copies, _, _, turns = recoloured_copies(train.images, train.en, train.zh, recolour)
        turned = copies[turns.flatten() != 0]  # the copies kept as they are add nothing new
        result["recoloured_copies"] = {"copies_per_image": recolour.copies, "recoloured": int((turns != 0).sum()),
                                       "kept_as_they_are": int((turns == 0).sum()), "bodies": body_counts(turned)}
    # the colour prompts say "pokemon"; the tokenizer neither lowercases nor strips accents
    result["captions_with_word"] = {word: sum(word in caption.lower() for caption in train.en + val.en)
                                    for word in ("pokemon", "pokémon")}  # any case
    result["command"] = command_line("python -m benchmarks.colour_breakdown", argv)
    for who in ("samples", "real"):
        figures = result[who]
        mix = figures.get("at_prompt_mix")
        at_mix = "" if mix is None else f" ({mix:.3f} at the prompts' colour mix)"
        print(f"{who:8s} overall {figures['overall']:.3f}{at_mix} ({figures['count']})  " +
              "  ".join(f"{c} {v:.2f}" for c, v in figures["by_colour"].items()) +
              f"  chromatic share of the foreground {figures['chromatic_share']:.3f}", flush=True)
        for colour, shares in figures["hue_shares"].items():
            print(f"  '{colour}': " + "  ".join(f"{family} {share:.2f}" for family, share in shares.items()))
    print(f"training bodies (of {len(train)}): " +
          ", ".join(f"{family} {count}" for family, count in result["training_bodies"].items()))
    if recolour.copies:
        copies = result["recoloured_copies"]
        print(f"recoloured copies ({copies['recoloured']} recoloured, {copies['kept_as_they_are']} kept): bodies " +
              ", ".join(f"{family} {count}" for family, count in copies["bodies"].items()))
    print("captions with the word: " + ", ".join(f"'{w}' {n}" for w, n in result["captions_with_word"].items()))
    if args.paired_with:
        print(f"{args.paired_with} against {args.pairs}, sample for sample:\n"
              + paired_table({str(args.paired_with): result["paired_with"]["paired"]}))
    for colour, use in result["caption_use"].items():
        print(f"captions: '{colour}' {use['mentions']} mentions, {use['detail_share']:.0%} before a detail noun, "
              f"{use['body_share']:.0%} before a body noun")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    run_cli(main)

"""Evaluate a run: VAE reconstruction, CLIP retrieval, and generation quality against real images.

``python -m pipelines.evaluate --run runs/NAME --data DIR [--judge runs/REF/clip] [--vae/--clip/--unet DIR]``
writes ``evaluation.json`` and ``evaluation.md`` into the run (or ``--out``).

Generation is judged on the validation captions (English and Chinese, one fixed seed per row) and on colour
prompts, against the real images, by a fixed judge: the image/text towers of a CLIP stage trained apart from
the run's own (``--judge``; default: the run's ``judge/``, which ``train_all.py`` trains with its own seed).
The run's own CLIP is a poor judge: guidance pushes samples towards exactly the features it scores. Give
every run of a swap study the same judge, so swapping the CLIP stage does not change the ruler.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from clip.metrics import cosine_similarities, evaluating, retrieval_metrics
from clip.model import CLIPModel
from data import CaptionSet, load_captions
from data.augment import to_float
from diffusion.colour_sentences import body_colours, with_body_colour
from engine.cli import check_output_file
from engine.errors import UserError, add_debug_flag, run_cli
from engine.images import save_grid
from engine.stage import WEIGHTS_FILE, file_fingerprint, write_json
from vae.metrics import evaluate_reconstruction

from .metrics import (CHROMA_MIN, COPY_NEIGHBOURS, FAMILY_NAMES, PROMPT_COLOURS, at_prompt_mix, colour_hits,
                      colour_prompts, composition, composition_means, composition_per_image, composition_records,
                      cosine_nearest, first_named_colours, frechet_distance, held_out_copies, hue_blind_thumbnails,
                      kernel_distance, near_copies, nearest_indices, seed_diversity, share_by_colour, sharpness,
                      shrunk, silhouette_thumbnails, thumbnails)
from .stages import (StageStack, add_stage_arguments, check_guide, generation_size, judge_path, load_stack,
                     sampling_size, stack_infos, stage_paths)
from .text_to_image import SIZE_HELP, GenerationSettings, add_sampling_arguments, generate, sampling_settings


# judge_features are unit vectors: KID's kernel at its usual 1 / d would be nearly linear on them
JUDGE_KID_GAMMA = 1.0


@torch.no_grad()
def judge_features(judge: CLIPModel, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Normalised image embeddings of [-1, 1] images under a CLIP stage (the judge's, or a run's own CLIP)."""
    device = next(judge.parameters()).device
    feats = [judge.encode_image(chunk.to(device).float()).float() for chunk in images.split(batch_size)]
    return F.normalize(torch.cat(feats), dim=-1).cpu()


@torch.no_grad()
def text_features(clip: CLIPModel, texts: Sequence[str]) -> torch.Tensor:
    """Normalised text embeddings of ``texts`` under a CLIP stage (the judge's, or a run's own CLIP)."""
    _, text = clip.encode_text(clip.tokenizer.encode(list(texts)).to(next(clip.parameters()).device))
    return F.normalize(text.float(), dim=-1).cpu()


@torch.no_grad()
def colour_guesses(clip: CLIPModel, images: torch.Tensor, batch_size: int = 64
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(labels, {language: guesses})`` over the images (uint8) whose body colour
    (``diffusion.colour_sentences.body_colours``, what their colour sentence names) is a prompt colour: each one's
    index in ``PROMPT_COLOURS``, and the colour prompt ("a red pokemon", ...; "一只红色的宝可梦", ...) its CLIP
    embedding is nearest in cosine, per language. The model is evaluated in eval mode and its mode restored."""
    bodies = body_colours(images)
    wanted = [i for i, body in enumerate(bodies) if body is not None and FAMILY_NAMES[body] in PROMPT_COLOURS]
    labels = torch.tensor([PROMPT_COLOURS.index(FAMILY_NAMES[bodies[i]]) for i in wanted], dtype=torch.long)
    if not wanted:
        return labels, {"en": labels, "zh": labels}
    size = clip.config.image_size
    with evaluating(clip):
        image_embed = torch.cat([  # indexed a batch at a time: no full-size copy of every wanted image
            judge_features(clip, F.interpolate(to_float(images[batch]), size=(size, size), mode="area"))
            for batch in torch.tensor(wanted).split(batch_size)])
        prompts, _, _ = colour_prompts(seeds=1)  # per colour of PROMPT_COLOURS: English, then Chinese
        guesses = {}
        for language, texts in (("en", prompts[0::2]), ("zh", prompts[1::2])):
            guesses[language] = cosine_similarities(image_embed, text_features(clip, texts)).argmax(dim=1)
    return labels, guesses


def colour_zero_shot(clip: CLIPModel, images: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """How well a CLIP stage's text side grounds the colour words the UNet is conditioned on: the share of the
    prompt-coloured bodies among ``images`` (uint8) that ``colour_guesses`` takes for their own colour, per
    language (``colour_zero_shot_en``, ``_zh``; chance 1 / 6) and per body colour over both languages
    (``colour_zero_shot_red``, ...; for the colours some image has), over ``colour_zero_shot_images`` images."""
    return zero_shot_shares(*colour_guesses(clip, images, batch_size))


def zero_shot_shares(labels: torch.Tensor, guesses: dict[str, torch.Tensor]) -> dict[str, float]:
    """``colour_zero_shot``'s figures from ``colour_guesses``' labels and guesses."""
    results: dict[str, float] = {"colour_zero_shot_images": len(labels)}
    if not len(labels):
        return results
    hits = {language: guess == labels for language, guess in guesses.items()}
    results.update({f"colour_zero_shot_{language}": hit.float().mean().item() for language, hit in hits.items()})
    both = torch.stack(list(hits.values())).float()
    for index, colour in enumerate(PROMPT_COLOURS):
        if (labels == index).any():
            results[f"colour_zero_shot_{colour}"] = both[:, labels == index].mean().item()
    return results


@torch.no_grad()
def clip_score(judge: CLIPModel, features: torch.Tensor, prompts: Sequence[str]) -> float:
    """100 x mean cosine between each image's judge embedding and its prompt's judge text embedding."""
    return float(100 * (features * text_features(judge, prompts)).sum(-1).mean())


@torch.no_grad()
def judged_and_shrunk(judge: CLIPModel, images: torch.Tensor, size: int, batch_size: int = 64,
                      mirror: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Judge features of images (uint8, or [-1, 1] float; ``mirror``: of their mirror images) at ``size`` px, and
    [-1, 1] copies at ``MEASURE_SIZE`` (``shrunk``), the size every pixel measure and picture works at. A batch at a
    time, so full-size float copies of a whole set (gigabytes at 512 px) never pile up on the host."""
    features, small = [], []
    for chunk in images.split(batch_size):
        chunk = to_float(chunk) if chunk.dtype == torch.uint8 else chunk.float()
        if mirror:
            chunk = chunk.flip(-1)
        if chunk.shape[-1] != size:
            chunk = F.interpolate(chunk, size=(size, size), mode="area")
        features.append(judge_features(judge, chunk))
        small.append(shrunk(chunk))
    return torch.cat(features), torch.cat(small)


@dataclass
class RealReference:
    """What samples are measured against, which depends only on the judge, the data and the size: the
    validation images' judge features and 128-px copies, the training images' and their mirrors' (the
    near-copy banks), each set's thumbnails for the pixel copy rules, and the real images' own figures
    (``*_real``). Build it once per evaluation setup."""

    val_features: torch.Tensor
    val_small: torch.Tensor
    bank: torch.Tensor  # training images then their mirrors, at MEASURE_SIZE
    judge_bank: torch.Tensor
    val_thumbs: torch.Tensor  # thumbnails(val_small)
    bank_thumbs: torch.Tensor  # thumbnails(bank)
    val_hue_blind: torch.Tensor  # hue_blind_thumbnails(val_small)
    bank_hue_blind: torch.Tensor  # hue_blind_thumbnails(bank)
    val_silhouettes: torch.Tensor  # silhouette_thumbnails(val_small)
    bank_silhouettes: torch.Tensor  # silhouette_thumbnails(bank)
    figures: dict[str, float]


def real_reference(judge: CLIPModel, train: CaptionSet, val: CaptionSet, size: int) -> RealReference:
    """The ``RealReference`` of ``train`` and ``val`` at ``size`` px under ``judge``."""
    val_features, val_small = judged_and_shrunk(judge, val.images, size)
    train_features, train_small = judged_and_shrunk(judge, train.images, size)
    mirror_features, mirror_small = judged_and_shrunk(judge, train.images, size, mirror=True)
    real_all = torch.cat([train_small, val_small])
    figures = {"clip_score_real_en": clip_score(judge, val_features, val.en)}  # the ceiling for this judge
    named_real = first_named_colours(train.en + val.en)
    if named_real:
        index = torch.tensor([i for i, _ in named_real])
        real_named = [n for _, n in named_real]
        real_hits = colour_hits(real_all[index], real_named)
        figures["colour_adherence_real"] = float(real_hits.float().mean())
        by_colour = share_by_colour(real_hits, real_named)
        figures.update({f"colour_adherence_{colour}_real": share for colour, share in by_colour.items()})
        prompt_mix = at_prompt_mix(by_colour, PROMPT_COLOURS)  # the colour prompts name each alike
        if prompt_mix is not None:
            figures["colour_adherence_real_prompt_mix"] = prompt_mix
    figures.update({f"{key}_real": value for key, value in composition(real_all).items()})
    figures["sharpness_real"] = sharpness(real_all)
    # FD and KID of as many training images as one language has samples (spread over the set) against the
    # validation images: the floor a model that drew unseen real images would reach at this sample count
    peers = train_features[torch.linspace(0, len(train_features) - 1, len(val_features)).round().long()]
    figures["fd_real"] = frechet_distance(val_features, peers)
    figures["kid_real"] = kernel_distance(val_features, peers, gamma=JUDGE_KID_GAMMA)
    bank, judge_bank = torch.cat([train_small, mirror_small]), torch.cat([train_features, mirror_features])
    reference = RealReference(val_features, val_small, bank, judge_bank, thumbnails(val_small), thumbnails(bank),
                              hue_blind_thumbnails(val_small), hue_blind_thumbnails(bank),
                              silhouette_thumbnails(val_small), silhouette_thumbnails(bank), figures)
    # the near-copy shares unseen images score: each training image against the others (a 5 % quantile of a few
    # validation images' distances lets through more or less than 5 % of unseen images)
    pixel = held_out_copies(reference.bank_thumbs, reference.val_thumbs, relative_to=COPY_NEIGHBOURS)
    figures["near_copy_share_pixel_real"] = pixel["share"]
    figures["near_copy_share_pixel_relative_real"] = pixel["share_relative"]
    figures["near_copy_share_judge_real"] = held_out_copies(judge_bank, val_features, cosine=True)["share"]
    figures["near_copy_share_pixel_hue_blind_real"] = held_out_copies(reference.bank_hue_blind,
                                                                      reference.val_hue_blind)["share"]
    figures["near_copy_share_silhouette_real"] = held_out_copies(reference.bank_silhouettes,
                                                                 reference.val_silhouettes)["share"]
    return reference


def generation_metrics(stack: StageStack, judge: CLIPModel, train: CaptionSet, val: CaptionSet,
                       settings: GenerationSettings, diversity_prompts: int = 8, diversity_seeds: int = 4,
                       colour_seeds: int = 8, out_dir: Path | None = None, seed_offset: int = 0,
                       reference: RealReference | None = None,
                       records: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """Generation against the real images, each figure with its real-image reference (``*_real``).

    Samples: every validation caption in English and in Chinese (one fixed seed per row) and the colour prompts of
    ``pipelines.metrics.colour_prompts`` (``colour_seeds`` seeds each). FD / KID / CLIP score per language in the
    judge's space; composition (foreground share, border occupancy, frame-filling share, parts, the foreground's
    chromatic share), sharpness and near-copies (pixel space at 64 px and judge space, training mirrors in the bank)
    over all samples; colour adherence on the colour prompts (overall and per language), and on the same prompts and
    seeds with the body's colour sentence (``colour_adherence_body_sentence``); seed diversity. See
    pipelines/metrics.py. ``seed_offset`` shifts every sampling seed: another draw of the same evaluation, for the
    spread over seeds. ``reference``: the ``real_reference`` of this judge, data and size, when the caller measures
    several settings or seeds against it (built here otherwise). ``records``: a list that gets one record per sample
    (what it was drawn from, and what each bar's rule said of it) for ``paired_differences``.
    """
    size = settings.size
    reference = reference or real_reference(judge, train, val, size)
    real_feats, real, bank = reference.val_features, reference.val_small, reference.bank

    def sample(prompts: Sequence[str], seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return judged_and_shrunk(judge, generate(stack, prompts, [s + seed_offset for s in seeds], settings).cpu(),
                                 size)

    seeds = [int(r) for r in val.rows]  # one fixed seed per validation row
    out: dict[str, float] = {}
    samples, feats = [], []
    for language, prompts in (("en", val.en), ("zh", val.zh)):
        features, images = sample(prompts, seeds)
        out[f"fd_{language}"] = frechet_distance(real_feats, features)
        out[f"kid_{language}"] = kernel_distance(real_feats, features, gamma=JUDGE_KID_GAMMA)
        out[f"clip_score_{language}"] = clip_score(judge, features, prompts)
        samples.append(images)
        feats.append(features)

    colour_texts, colour_seed_list, named = colour_prompts(colour_seeds)
    colour_feats, colour_samples = sample(colour_texts, colour_seed_list)
    hits = colour_hits(colour_samples, named).float()
    out["colour_adherence"] = float(hits.mean())
    chinese = torch.tensor([not text.isascii() for text in colour_texts])
    out["colour_adherence_en"], out["colour_adherence_zh"] = float(hits[~chinese].mean()), float(hits[chinese].mean())
    out["colour_samples_en"], out["colour_samples_zh"] = int((~chinese).sum()), int(chinese.sum())
    out.update({f"colour_adherence_{colour}": share for colour, share in share_by_colour(hits, named).items()})
    out.update({f"colour_samples_{colour}": named.count(colour) for colour in dict.fromkeys(named)})
    # The same prompts and seeds with the body's colour sentence, as the training captions end (what a user's
    # --body-colour asks): does the UNet follow the sentence it was trained on where the bare word misses? Kept
    # out of the records and the other figures, which stay comparable with earlier evaluations.
    _, sentenced = sample([with_body_colour(text, colour) for text, colour in zip(colour_texts, named)],
                          colour_seed_list)
    sentenced_hits = colour_hits(sentenced, named).float()
    out["colour_adherence_body_sentence"] = float(sentenced_hits.mean())
    out.update({f"colour_adherence_body_sentence_{colour}": share
                for colour, share in share_by_colour(sentenced_hits, named).items()})
    samples.append(colour_samples)
    feats.append(colour_feats)
    every_sample, every_feature = torch.cat(samples), torch.cat(feats)

    each = composition_per_image(every_sample)
    out.update(composition_means(each))
    out["sharpness"] = sharpness(every_sample)
    out["samples"], out["colour_samples"] = len(every_sample), len(colour_samples)  # for the shares' error bars

    sample_thumbs = thumbnails(every_sample)
    pixel = near_copies(sample_thumbs, reference.bank_thumbs, reference.val_thumbs, relative_to=COPY_NEIGHBOURS)
    in_judge = near_copies(every_feature, reference.judge_bank, real_feats, cosine=True)
    hue_blind = near_copies(hue_blind_thumbnails(every_sample), reference.bank_hue_blind, reference.val_hue_blind)
    sample_outlines = silhouette_thumbnails(every_sample)
    silhouette = near_copies(sample_outlines, reference.bank_silhouettes, reference.val_silhouettes)
    out.update({"near_copy_share_pixel": pixel["share"], "near_copy_share_pixel_relative": pixel["share_relative"],
                "nn_dist_samples": pixel["sample_nn"],
                "nn_dist_real_val": pixel["val_nn"], "near_copy_share_judge": in_judge["share"],
                "nn_judge_dist_samples": in_judge["sample_nn"], "nn_judge_dist_real_val": in_judge["val_nn"],
                "near_copy_share_pixel_hue_blind": hue_blind["share"],
                "near_copy_share_silhouette": silhouette["share"]})
    sources = {"captions_en": len(feats[0]), "captions_zh": len(feats[1]), "colour_prompts": len(feats[2])}
    out.update(judge_copies_by_source(in_judge["copied"], sources))
    first_colour = len(every_sample) - len(colour_samples)  # the colour prompts come last
    colour_rows = in_judge["copied"][first_colour:]
    out.update({f"near_copy_share_judge_{colour}_prompts": share
                for colour, share in share_by_colour(colour_rows, named).items()})

    if records is not None:
        # A caption sample names its validation row, not the caption: an evaluation.json can then be shared
        # (committed, posted) without the dataset's text. The colour prompts are the project's own.
        drawn = [{"source": f"captions_{language}", "row": int(row)} for language in ("en", "zh") for row in val.rows]
        drawn += [{"source": "colour_prompts", "prompt": prompt} for prompt in colour_texts]
        drawn_seeds = seeds + seeds + colour_seed_list
        colour_hit = [None] * first_colour + hits.bool().tolist()
        records.extend({**what, "seed": seed + seed_offset, **composed, "copied_pixel": bool(by_pixel),
                        "copied_judge": bool(by_judge), "copied_silhouette": bool(by_outline), "colour_hit": hit}
                       for what, seed, composed, by_pixel, by_judge, by_outline, hit
                       in zip(drawn, drawn_seeds, composition_records(each), pixel["copied"], in_judge["copied"],
                              silhouette["copied"], colour_hit, strict=True))

    count = min(diversity_prompts, len(val))
    prompts = [p for p in val.en[:count] for _ in range(diversity_seeds)]
    div_feats, div_samples = sample(prompts, [1000 + i for i in range(len(prompts))])
    out.update(seed_diversity(div_samples, div_feats, count, diversity_seeds))
    if out_dir is not None:
        shown = min(8, len(val))
        save_grid(torch.cat([real[:shown], samples[0][:shown]]), out_dir / "eval_samples.png", nrow=shown,
                  max_side=128)
        save_pairs(colour_samples, bank[nearest_indices(sample_thumbs[first_colour:], reference.bank_thumbs)],
                   out_dir / "nearest_pairs.png")
        distance, nearest = cosine_nearest(every_feature, reference.judge_bank)
        closest = distance.argsort()[:JUDGE_PAIRS]
        save_pairs(every_sample[closest], bank[nearest[closest]], out_dir / "judge_pairs.png")
        closest = silhouette["distance"].argsort()[:JUDGE_PAIRS]
        save_pairs(every_sample[closest], bank[nearest_indices(sample_outlines[closest], reference.bank_silhouettes)],
                   out_dir / "silhouette_pairs.png")
    return {**out, **reference.figures}


SEED_SET_STRIDE = 10_000  # seed offset between an evaluation's seed sets: no sample seed is shared


# generation_metrics' counts, which add up over seed sets
SAMPLE_COUNTS = ("samples", "colour_samples", "colour_samples_en", "colour_samples_zh",
                 *(f"colour_samples_{colour}" for colour in PROMPT_COLOURS))


def over_seed_sets(draws: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """``generation_metrics`` draws of one setting (seed sets ``seed_offset = k * SEED_SET_STRIDE``) summarised:
    ``mean`` of each figure (the sample counts summed: a share's error bar is over every sample drawn) and, from
    two draws up, ``sd``, its standard deviation over the sets."""
    summary = {"mean": {key: (sum if key in SAMPLE_COUNTS else statistics.fmean)(d[key] for d in draws)
                        for key in draws[0]}}
    if len(draws) > 1:
        summary["sd"] = {key: statistics.stdev(d[key] for d in draws) for key in draws[0]}
    return summary


def judge_copies_by_source(copied: torch.Tensor, sources: dict[str, int]) -> dict[str, float]:
    """``near_copy_share_judge_<source>``: the judge-space near-copy share of each consecutive block of samples
    (``copied``: ``near_copies``' flag per sample, so one threshold judges every block; ``sources``: name -> rows,
    in order): whether copies come from the captions or from the short colour prompts."""
    if sum(sources.values()) != len(copied):
        raise ValueError(f"sources cover {sum(sources.values())} rows but there are {len(copied)} samples")
    out, start = {}, 0
    for name, rows in sources.items():
        out[f"near_copy_share_judge_{name}"] = float(copied[start:start + rows].double().mean())
        start += rows
    return out


PAIRS_COLUMNS, PAIRS_TILE = 12, 96  # pair pictures: samples per row, and their size (≤ 128 px: they show the data)
JUDGE_PAIRS = 24  # judge_pairs.png / silhouette_pairs.png: the samples closest to a training image


def save_pairs(samples: torch.Tensor, partners: torch.Tensor, path: Path, columns: int = PAIRS_COLUMNS,
               tile: int = PAIRS_TILE) -> None:
    """Rows of samples, each row followed by the row of their ``partners`` (the training images or mirrors
    nearest to them), at ``tile`` px: the pictures that show whether samples copy the data
    (``nearest_pairs.png``: every colour-prompt sample and its nearest in pixels; ``judge_pairs.png`` and
    ``silhouette_pairs.png``: the ``JUDGE_PAIRS`` samples nearest a training image in judge space and by
    silhouette, nearest first)."""
    columns = min(columns, len(samples))
    blank = torch.ones_like(samples[:1])  # fills a last, shorter row, so each sample stays over its partner
    rows = []
    for start in range(0, len(samples), columns):
        short = blank.expand(max(0, start + columns - len(samples)), *samples.shape[1:])
        rows += [samples[start:start + columns], short, partners[start:start + columns], short]
    save_grid(torch.cat(rows), path, nrow=columns, max_side=tile)


MIN_VAL_ROWS = 2  # FD's covariances and KID's unbiased estimate need two samples of the real images


def check_evaluation_data(val: CaptionSet) -> None:
    """Refuse, before anything is sampled, a validation split (every row numbered 9 modulo 10) too small for the
    figures measured against it."""
    rows = len(val)
    if rows < MIN_VAL_ROWS:
        raise UserError(f"the validation split of {val.source} has {rows} row(s) (rows 9, 19, 29, ...), but FD and "
                        f"KID need at least {MIN_VAL_ROWS} real images: evaluate on a data set of at least "
                        f"{10 * MIN_VAL_ROWS} rows")


def describe_judge(judge_dir: Path) -> str:
    """How an evaluation names its judge: the folder and its weights' fingerprint. The fingerprint is the judge's
    identity: one recipe trains bit for bit alike on one GPU kind, not across kinds (or on a CPU), so two
    evaluations' judge-space figures compare only under one fingerprint."""
    return f"{judge_dir} ({file_fingerprint(Path(judge_dir) / WEIGHTS_FILE)})"


def judge_fingerprint(evaluation: dict[str, Any]) -> str | None:
    """The judge fingerprint an ``evaluation.json`` names (``describe_judge``), or None where it names none."""
    match = re.search(r"\(([0-9a-f]{16})\)$", evaluation.get("judge", ""))
    return match.group(1) if match else None


def evaluate_run(stack: StageStack, data: CaptionSet, judge: CLIPModel, settings: GenerationSettings | None = None,
                 out_dir: Path | None = None, judge_name: str = "",
                 reference: RealReference | None = None) -> dict[str, Any]:
    """All metrics of one stack on the validation split of ``data`` (at the stack's image size); ``reference`` as
    in ``generation_metrics``."""
    settings = settings or GenerationSettings()
    started = time.perf_counter()
    train, val = data.subset("train"), data.subset("val")
    check_evaluation_data(val)
    device = stack.device
    results: dict[str, Any] = {"settings": vars(settings), "judge": judge_name,
                               "stages": {k: str(v.path) for k, v in stack.infos.items()}}
    recon = evaluate_reconstruction(stack.vae, val.images, batch_size=8, device=device)
    # at the generation size: below the VAE's training resolution this is lower than its stage's own PSNR
    results["vae"] = {"val_psnr": recon["psnr"], "val_ssim": recon["ssim"], "image_size": val.images.shape[-1]}
    clip_size = stack.clip.config.image_size
    val_small = F.interpolate(to_float(val.images), size=(clip_size, clip_size), mode="area").to(device)
    results["clip"] = {**retrieval_metrics(stack.clip, val_small, {"en": val.en, "zh": val.zh}),
                       **colour_zero_shot(stack.clip, train.images)}  # the bodies the UNet learnt colours from
    records: list[dict[str, Any]] = []
    results["generation"] = generation_metrics(stack, judge, train, val, settings, out_dir=out_dir,
                                               reference=reference, records=records)
    results["samples"] = records  # what each sample was and what each rule said of it: paired_differences
    results["minutes"] = (time.perf_counter() - started) / 60
    return results


METRIC_SECTIONS = ("vae", "clip", "generation")


def metrics_table(columns: dict[str, dict[str, Any]]) -> str:
    """Markdown table of evaluations: one column per named ``evaluation.json`` dict, one row per metric found
    in any of them ("—" where a column lacks it)."""
    keys: list[tuple[str, str]] = []
    for results in columns.values():
        keys += [(section, k) for section in METRIC_SECTIONS for k in results.get(section, {})
                 if (section, k) not in keys]
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for section, key in keys:
        cells = []
        for results in columns.values():
            value = results.get(section, {}).get(key)
            cells.append(f"{value:.4g}" if isinstance(value, float) else ("—" if value is None else str(value)))
        lines.append(f"| {section}/{key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# (key, what it measures, target for the samples): the picture-quality ruler of issue 13, each shown beside the
# real images' value (key + "_real"; for a near-copy share, what unseen images score: ``held_out_copies``).
QUALITY_ROWS = (
    ("fd_en", "FD in the judge's space, English captions (real: training against validation images)", "(context)"),
    ("kid_en", "KID in the judge's space, English captions (real: the same)", "(context)"),
    ("fg_share", "foreground share (pixels not near-white)", "real ± 0.06"),
    ("border_fg", "border occupancy (foreground share of the outer ring)", "≤ 0.06"),
    ("frame_filling_share", "samples that fill the frame (border occupancy > 0.25)", "≤ 0.03"),
    ("parts_mean", "foreground regions > 1 % of the image, per sample", "≤ 1.15"),
    ("chromatic_share", f"share of the foreground with a hue (chroma ≥ {CHROMA_MIN:g}, not dark): low for pale or "
     "grey pictures", "(context)"),
    ("near_copy_share_pixel", "near-copies of a training image, pixel space (64 px, mirrors in the bank)", "≤ 0.05"),
    ("near_copy_share_judge", "near-copies of a training image, judge space", "≤ 0.05"),
    ("near_copy_share_pixel_relative", f"near-copies, pixel space, relative to the {COPY_NEIGHBOURS} nearest "
     "(blends pass; very pale pictures still count)", "(context)"),
    ("near_copy_share_pixel_hue_blind", "near-copies, pixel space without hue (value and chroma: a recoloured copy "
     "can count)", "(context)"),
    ("near_copy_share_silhouette", "near-copies of a training image's silhouette (foreground mask at 64 px: a "
     "body plan redrawn in other colours and patterns counts)", "(context)"),
    ("colour_adherence", "named colour among the two dominant foreground hues (and ≥ 5 % of the foreground)",
     "≥ 0.75"),
)


# the real images' value of a figure not named key + "_real": FD and KID have one floor for both languages; the
# colour prompts name six colours alike, so the real images' adherence is theirs per colour at that mix
REAL_KEYS = {"fd_en": "fd_real", "kid_en": "kid_real", "colour_adherence": "colour_adherence_real_prompt_mix"}


def real_key(key: str) -> str:
    """The key of the real images' value of a generation figure."""
    return REAL_KEYS.get(key, f"{key}_real")


# Each share among generation_metrics' figures and the count of samples it is taken over (their error bars).
SHARE_COUNTS = {"frame_filling_share": "samples", "near_copy_share_pixel": "samples",
                "near_copy_share_judge": "samples", "near_copy_share_pixel_relative": "samples",
                "near_copy_share_pixel_hue_blind": "samples", "near_copy_share_silhouette": "samples",
                "colour_adherence": "colour_samples", "colour_adherence_en": "colour_samples_en",
                "colour_adherence_zh": "colour_samples_zh", "colour_adherence_body_sentence": "colour_samples",
                **{f"colour_adherence_{kind}{colour}": f"colour_samples_{colour}"
                   for kind in ("", "body_sentence_") for colour in PROMPT_COLOURS}}


def share_error(generation: dict[str, Any], key: str) -> float | None:
    """The binomial standard error of a share p taken over a known number of samples n (the noise of the seeds
    drawn, had without drawing more), in Agresti and Coull's form: sqrt(q (1 - q) / (n + 4)) with q = (p n + 2) /
    (n + 4), two hits and two misses added, so a share of 0 or 1 does not read as exact (the plain sqrt(p (1 - p)
    / n) is 0 there); None for a figure that is no such share."""
    value, count = generation.get(key), generation.get(SHARE_COUNTS.get(key, ""))
    if value is None or not count:
        return None
    q = (value * count + 2) / (count + 4)
    return (q * (1 - q) / (count + 4)) ** 0.5


# Per-sample flags of generation_metrics' sample records (one bar's rule each) and the paired tables' names.
PAIRED_FLAGS = {"copied_pixel": "near-copies, pixel space", "copied_judge": "near-copies, judge space",
                "colour_hit": "named colour among the two dominant hues",
                "frame_filling": "samples that fill the frame"}
# Per-sample figures of the records that pair as means (a paired difference with its standard error).
PAIRED_MEANS = {"parts": "foreground regions per sample", "fg_share": "foreground share",
                "chromatic_share": "share of the foreground with a hue"}


def mcnemar_p(only_before: int, only_after: int) -> float:
    """Exact two-sided McNemar p-value: how often a fair coin splits ``only_before + only_after`` discordant pairs
    at least this unevenly."""
    pairs = only_before + only_after
    tail = sum(math.comb(pairs, k) for k in range(min(only_before, only_after) + 1)) / 2 ** pairs
    return min(1.0, 2 * tail)


def sample_key(record: dict[str, Any]) -> tuple:
    """What a sample record was drawn from: its source, its prompt or validation row, and its seed. Two records of
    one key are the same draw under two settings or models."""
    return record["source"], record.get("prompt", record.get("row")), record["seed"]


def paired_differences(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``after`` against ``before``, sample for sample: over the samples both drew (one source, prompt or caption
    row, and seed; records of ``generation_metrics(records=...)``), each flag's share before and after, the pairs
    where only one side has it and McNemar's exact p-value, and each ``PAIRED_MEANS`` figure's mean paired difference;
    each difference with its standard error beside the one the two means would have unpaired. A seed decides
    much of its sample whatever the setting or model, so the paired error is the smaller, and a difference too
    small to see in two means can show here."""
    earlier = {sample_key(record): record for record in before}
    pairs = [(earlier[sample_key(record)], record) for record in after if sample_key(record) in earlier]
    if len(pairs) < 2:
        raise ValueError(f"only {len(pairs)} sample(s) drawn by both sides (same source, prompt or row, and seed): "
                         "compare evaluations made with the same prompts and seeds")
    out: dict[str, Any] = {"pairs": len(pairs)}
    for flag in PAIRED_FLAGS:
        both = [(a[flag], b[flag]) for a, b in pairs if a.get(flag) is not None and b.get(flag) is not None]
        if not both:
            continue
        only_before = sum(a and not b for a, b in both)
        only_after = sum(b and not a for a, b in both)
        share_before, share_after = (sum(side) / len(both) for side in zip(*both))
        n, moved = len(both), only_after - only_before
        out[flag] = {"pairs": n, "before": share_before, "after": share_after,
                     "difference": share_after - share_before, "only_before": only_before,
                     "only_after": only_after, "p_value": mcnemar_p(only_before, only_after),
                     "error_paired": (only_before + only_after - moved ** 2 / n) ** 0.5 / n,
                     "error_unpaired": ((share_before * (1 - share_before) + share_after * (1 - share_after))
                                        / n) ** 0.5}
    for figure in PAIRED_MEANS:
        both = [(a[figure], b[figure]) for a, b in pairs if a.get(figure) is not None and b.get(figure) is not None]
        if len(both) < 2:  # records written before the figure was (an older evaluation's)
            continue
        before_values, after_values = zip(*both)
        differences = [b - a for a, b in both]
        count = len(both)
        out[figure] = {"pairs": count, "before": statistics.fmean(before_values),
                       "after": statistics.fmean(after_values), "difference": statistics.fmean(differences),
                       "error_paired": statistics.stdev(differences) / count ** 0.5,
                       "error_unpaired": ((statistics.variance(before_values) + statistics.variance(after_values))
                                          / count) ** 0.5}
    return out


def paired_against(reference: Sequence[dict[str, Any]], others: dict[str, Sequence[dict[str, Any]]]
                   ) -> dict[str, dict[str, Any]]:
    """``paired_differences`` of each of ``others``' sample records against ``reference``'s, leaving out those
    that share too few samples with it (an evaluation from before the records, or of other prompts or seeds)."""
    paired = {}
    for name, records in others.items():
        try:
            paired[name] = paired_differences(reference, records)
        except ValueError:
            continue
    return paired


def paired_table(columns: dict[str, dict[str, Any]]) -> str:
    """Markdown table of ``paired_differences`` results, one column per compared name."""
    lines = ["| sample for sample | " + " | ".join(f"{name} ({paired['pairs']} samples)"
                                                for name, paired in columns.items()) + " |",
             "|---|" + "---|" * len(columns)]
    for flag, label in PAIRED_FLAGS.items():
        cells = []
        for paired in columns.values():
            row = paired.get(flag)
            cells.append("—" if row is None else
                         f"{row['before']:.3f} → {row['after']:.3f} ({row['difference']:+.3f}; "
                         f"{row['only_before']} / {row['only_after']} pairs only before / after, "
                         f"p {row['p_value']:.2g})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for key, label in PAIRED_MEANS.items():
        cells = ["—" if (row := paired.get(key)) is None else
                 f"{row['before']:.3f} → {row['after']:.3f} ({row['difference']:+.3f} ± {row['error_paired']:.3f} "
                 f"paired, ± {row['error_unpaired']:.3f} unpaired)" for paired in columns.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def quality_table(generation: dict[str, Any]) -> str:
    """Markdown table of the picture-quality metrics: samples, real images, target. A share taken over a known
    number of samples n carries its binomial standard error (``share_error``): the noise of the seeds drawn."""
    lines = ["| metric | samples | real images | target |", "|---|---|---|---|"]
    with_error = False
    for key, description, target in QUALITY_ROWS:
        if key not in generation:
            continue
        real = generation.get(real_key(key))
        real_text = "—" if real is None else f"{real:.3f}"
        sample_text, error = f"{generation[key]:.3f}", share_error(generation, key)
        if error is not None:
            sample_text += f" ± {error:.3f}"
            with_error = True
        lines.append(f"| {description} | {sample_text} | {real_text} | {target} |")
    if with_error:
        lines += ["", "± one binomial standard error over the samples drawn; two such shares that differ "
                  "by less than about three of them are within noise."]
    return "\n".join(lines) + "\n"


def markdown_table(results: dict[str, Any]) -> str:
    """The metrics of one evaluation as markdown: the picture-quality table, then every metric."""
    quality = quality_table(results["generation"]) + "\n" if "generation" in results else ""
    return quality + metrics_table({"value": results})


def default_judge(stack: StageStack, run: Path | None = None) -> Path:
    """The judge of ``run`` (default: the run the UNet stage belongs to), or the stack's own CLIP (a biased judge,
    so it warns)."""
    separate = judge_path(run if run is not None else stack.infos["unet"].path.parent)
    if (separate / "model.safetensors").is_file():
        return separate
    warnings.warn(f"no separate judge at {separate}: judging with the run's own CLIP, which guidance optimises "
                  "(scores run high); pass --judge with a CLIP stage trained apart", stacklevel=2)
    return Path(stack.infos["clip"].path)


def evaluate_to_folder(stack: StageStack, data_source: str, out_dir: Path, judge_dir: Path | None = None,
                       settings: GenerationSettings | None = None) -> dict[str, Any]:
    """Evaluate ``stack`` on ``data_source`` and write ``evaluation.json`` and ``evaluation.md`` into ``out_dir``.

    The judge is the CLIP stage at ``judge_dir`` (default: the judge of the run the UNet stage belongs to, else the
    stack's own CLIP, with a warning).
    """
    settings = settings or GenerationSettings(size=stack.image_size)
    if judge_dir is None:
        judge_dir = default_judge(stack)
    judge = CLIPModel.load(judge_dir, device=stack.device).eval()
    data = load_captions(data_source, resolution=settings.size)
    results = evaluate_run(stack, data, judge, settings, out_dir=out_dir, judge_name=describe_judge(judge_dir))
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused evaluation leaves no empty folder
    write_json(out_dir / "evaluation.json", results)
    header = f"Sampled with {settings.describe()}; judged by {results['judge']}.\n\n"
    (out_dir / "evaluation.md").write_text(header + markdown_table(results), encoding="utf-8")
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__.split("\n\n")[0])
    add_debug_flag(parser)
    add_stage_arguments(parser)
    parser.add_argument("--data", required=True, help="captions source (folder, hub id or 'shapes')")
    parser.add_argument("--judge", type=Path,
                        help="CLIP stage folder used as the fixed judge (default: the run's judge/)")
    parser.add_argument("--out", type=Path, help="where evaluation.json/.md go (default: the run folder)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the evaluation already in the output folder (default: refuse; or pass "
                             "another --out)")
    parser.add_argument("--size", type=int, help=f"{SIZE_HELP} (default: the UNet's training resolution)")
    add_sampling_arguments(parser)
    parser.add_argument("--device")
    args = parser.parse_args(argv)
    default_out = args.run or stage_paths(args.run, args.vae, args.clip, args.unet)["unet"]
    out = args.out or default_out
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for evaluation.json/.md and the pictures")
    check_output_file(out / "evaluation.json", "--out", overwrite=True)  # no file where a folder above should be
    # an earlier evaluation (the run's own, however the folder is named, or another's written there), which
    # pipelines.compare, pipelines.paired and benchmarks.copy_recurrence read: kept unless told
    if (out / "evaluation.json").is_file() and not args.overwrite:
        whose = "the run's own evaluation" if out.resolve() == default_out.resolve() else "an earlier evaluation"
        raise UserError(f"{out / 'evaluation.json'} exists ({whose}); write this one elsewhere with --out DIR, "
                        "or pass --overwrite to replace it")
    infos = stack_infos(args.run, vae=args.vae, clip=args.clip, unet=args.unet)  # config files: checked before weights
    settings = sampling_settings(args, size=sampling_size(args.size, infos["vae"].model, infos["unet"].model,
                                                          generation_size(infos)))
    if settings.guide_unet is not None:  # before the real images' reference, not at the first draw
        check_guide(settings.guide_unet, infos["unet"])
    stack = load_stack(args.run, vae=args.vae, clip=args.clip, unet=args.unet, device=args.device)
    judge = args.judge or default_judge(stack, args.run)
    results = evaluate_to_folder(stack, args.data, out, judge, settings)
    print(json.dumps({k: results[k] for k in ("vae", "clip", "generation")}, indent=2))
    return results


if __name__ == "__main__":
    run_cli(main)

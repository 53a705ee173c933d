"""Stage studies as one command: change or swap stages of a finished run, retrain only what that changes, and
judge every variant with the base run's judge, prompts and seeds in one report.

    python -m pipelines.study --base runs/pokemon --data ../shared/pokemon --out runs/study_terms \\
        --variant "no_terms: --unet.div_weight=0 --unet.cons_weight=0"
    python -m pipelines.study --base runs/pokemon --data ../shared/pokemon --out runs/study_clip \\
        --variant "english_only: --clip.zh_prob=0" --variant "weak_clip: --clip.epochs=1"
    python -m pipelines.study --base runs/pokemon --data ../shared/pokemon --out runs/study_vae \\
        --variant "other_vae: vae=runs/other/vae" --eval-seeds 3
    torchrun --nproc-per-node 2 -m pipelines.study --base runs/pokemon ...   # training on every rank

A variant is ``NAME: ITEMS``. Each item is ``--STAGE.key=value`` (a config override on top of the base stage's
recorded config, as in train_all.py) or ``STAGE=FOLDER`` (a finished stage folder, taken as it is); STAGE is
vae, clip or unet. A changed stage is trained into ``OUT/NAME/STAGE``, and so is every stage downstream of it
(a UNet trained on another VAE's latents or another CLIP's text states is another model) unless that one is
given as a folder; every other stage is the base run's. The judge (the base run's ``judge/``) never changes.
The plan (what is trained or taken, per variant, with a time estimate from the base run's minutes) is printed
before anything trains; ``--plan-only`` stops there.

Every column (the base and each variant) is evaluated the same way: ``pipelines.evaluate``'s metrics on the
same prompts and seeds, ``--steps`` sampling steps at one size (``--size``; by default the base UNet's training
resolution), at ``--guidance`` (by default each UNet config's scale: the training grids') with each UNet config's
guidance rescale, at every noise level unless ``--guidance-interval`` is given (e.g. the generation default's
``--guidance 4 --guidance-interval 0.28 7.5``), with generation's default step and condition noise;
``--eval-seeds K`` repeats the sampled metrics with K seed sets, for the spread that tells an effect from noise.
``--concurrent`` trains the variants as parallel processes (one GPU, eager: no compile), which pays when one small
model alone leaves the GPU idle. Re-running skips finished columns. The report measures every column against the
base; ``--reference NAME`` measures them against a variant instead (say, terms off against the regime they act
in), and a finished study run again with it is re-read without training. Writes ``OUT/report.md`` (sentences, plan,
metrics table with differences, each column's UNet fit, grid, loss curves, bar chart), ``OUT/compare.png``,
``OUT/losses.png``, ``OUT/metrics.png``, ``OUT/study.json``, and per column ``OUT/NAME/`` (its trained stages,
``stages.json``, ``evaluation.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image, ImageDraw

import train_all
from clip.model import CLIPModel
from data import CaptionSet, load_captions
from diffusion.colour_sentences import derived_inputs
from diffusion.train import lowres_folder
from engine import distributed
from engine.cli import check_counts, command_line
from engine.config import choose_preset, config_to_dict, setting_differences, unrecorded_values
from engine.errors import UserError, add_debug_flag, run_cli
from engine.runlog import SPIKE_FACTOR, read_records
from engine.stage import (CONFIG_FILE, METRICS_FILE, StageError, check_folder_path, folder_lock, is_complete,
                          read_stage, record_preset, write_json)
from pipelines.evaluate import (SEED_SET_STRIDE, RealReference, check_evaluation_data, describe_judge, evaluate_run,
                                generation_metrics, over_seed_sets, paired_against, paired_table, real_key,
                                real_reference, share_error)
from pipelines.metrics import PROMPT_COLOURS
from pipelines.stages import (finished_stage_differences, generation_size, judge_path, load_stack, sampling_size,
                              stage_kind, stage_paths, stage_settings, write_stages_record)
from pipelines.text_to_image import (DEFAULT_CONDITION_NOISE, DEFAULT_STEP_NOISE, SIZE_HELP, GenerationSettings,
                                     draw_showcase, showcase_layout)

STUDY_STAGES = ("vae", "clip", "unet")  # the judge is the study's ruler: the base run's, for every column
# A UNet trained on another VAE's latents or another CLIP's text states is another model: retrain it.
DOWNSTREAM = {"vae": ("unet",), "clip": ("unet",), "unet": ()}
BASE = "base"  # the column of the base run itself
GRID_SEEDS = 2  # seeds per prompt in each column's block of the side-by-side grid
VARIANT_FILE = "variant.json"
EVALUATION_FILE = "evaluation.json"
GRID_BLOCK_FILE = "grid_block.png"
SUMMARY_KEYS = ("vae", "clip", "generation", "generation_sd", "train_minutes", "train_steps")  # kept in study.json
# (section of evaluation.json, key, label, is a share): the table's rows, the bar chart and the sentences.
KEY_METRICS = (
    ("generation", "fd_en", "FD (en)", False),
    ("generation", "fd_zh", "FD (zh)", False),
    ("generation", "clip_score_en", "CLIP score (en)", False),
    ("generation", "clip_score_zh", "CLIP score (zh)", False),
    ("generation", "colour_adherence", "colour adherence", True),  # real column: the prompts' colour mix
    ("generation", "colour_adherence_en", "colour adherence (en)", True),
    ("generation", "colour_adherence_zh", "colour adherence (zh)", True),
    # per named colour (16 samples each): which colours a variant fixes or breaks
    *(("generation", f"colour_adherence_{colour}", f"colour adherence ({colour})", True) for colour in PROMPT_COLOURS),
    ("generation", "near_copy_share_pixel", "near-copies (pixel)", True),
    ("generation", "near_copy_share_judge", "near-copies (judge)", True),
    ("generation", "near_copy_share_pixel_relative", "near-copies (pixel, relative)", True),
    ("generation", "near_copy_share_pixel_hue_blind", "near-copies (pixel, hue-blind)", True),
    ("generation", "near_copy_share_silhouette", "near-copies (silhouette)", True),
    ("generation", "fg_share", "foreground share", True),
    ("generation", "chromatic_share", "foreground with a hue", True),
    ("generation", "border_fg", "border occupancy", True),
    ("generation", "frame_filling_share", "frame-filling samples", True),
    ("generation", "parts_mean", "parts per sample", False),
    ("generation", "sharpness", "sharpness", False),
    ("generation", "diversity_feature", "seed diversity (judge)", False),
    ("vae", "val_psnr", "VAE PSNR at the sampling size (dB)", False),
    ("clip", "t2i_r1_en", "CLIP text-to-image R@1 (en)", True),
    ("clip", "t2i_r1_zh", "CLIP text-to-image R@1 (zh)", True),
)


@dataclass
class Variant:
    """One ``--variant``: config overrides per stage and stage folders taken as they are."""

    name: str
    overrides: dict[str, dict[str, str]]
    folders: dict[str, Path]
    spec: str  # the items, as written


def split_named(text: str, option: str, example: str) -> tuple[str, list[str]]:
    """``NAME: ITEMS`` (an option's value naming a column or setting) -> ``(NAME, [ITEM, ...])``; NAME must be a
    plain word of letters, digits, ``_``, ``.`` and ``-`` (``lr3e-4``) that does not start with ``.`` or ``-``:
    it names a folder."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise UserError(f"{option} takes 'NAME: ITEMS' with NAME a plain word (letters, digits, _ . -), e.g. "
                        f"\"{example}\", got {text!r}")
    return name, rest.split()


def parse_variant(text: str) -> Variant:
    """``NAME: --STAGE.key=value STAGE=FOLDER ...`` -> ``Variant``; every mistake is a one-line ``UserError``."""
    name, items = split_named(text, "--variant", "no_terms: --unet.div_weight=0")
    if name == BASE:
        raise UserError(f"a variant cannot be named '{BASE}': that is the base run's column; pick another name")
    overrides: dict[str, dict[str, str]] = {stage: {} for stage in STUDY_STAGES}
    folders: dict[str, Path] = {}
    for item in items:
        if item.startswith("--"):
            key, eq, value = item[2:].partition("=")
            stage, _, field = key.partition(".")
            target = overrides.get(stage)
        else:
            stage, eq, value = item.partition("=")
            field, target = stage, folders if stage in STUDY_STAGES else None
        if stage == "judge":
            raise UserError(f"variant {name}: {item!r} changes the judge, the study's fixed ruler; a study compares "
                            "variants under one judge (the base run's judge/), so leave it out")
        if not eq or target is None or not field:
            raise UserError(f"variant {name}: cannot read {item!r}; write --STAGE.key=value (a config override) or "
                            f"STAGE=FOLDER (a finished stage), with STAGE one of {', '.join(STUDY_STAGES)}")
        if target is folders:
            folders[stage] = Path(value)
        else:
            overrides[stage][field] = value
    both = [stage for stage in folders if overrides[stage]]
    if both:
        raise UserError(f"variant {name}: the {both[0]} stage is given as a folder and has overrides; a given folder "
                        "is taken as it is, so drop one of them")
    if not folders and not any(overrides.values()):
        raise UserError(f"variant {name} changes nothing; add --STAGE.key=value overrides or STAGE=FOLDER items")
    return Variant(name=name, overrides=overrides, folders=folders, spec=" ".join(items))


@dataclass
class ColumnPlan:
    """What one column of the study is made of: every stage's folder and where it comes from."""

    name: str
    spec: str
    folder: Path  # OUT/NAME
    stages: dict[str, Path]  # vae, clip, unet and judge
    sources: dict[str, str]  # stage -> "base" | "given" | "trained"
    configs: dict[str, Any]  # the training configs of the stages trained into ``folder``
    presets: dict[str, str]  # the preset each trained stage's config was built on (the base stage's)
    estimate_minutes: float | None  # training, from the base stages' minutes; None when not recorded
    changed: tuple[str, ...]  # the stages the variant changes itself (downstream retraining aside)


def base_stages(base: Path) -> dict[str, Path]:
    """The base run's vae, clip, unet and judge folders (``stages.json`` when it reused stages), all checked."""
    stages = {**stage_paths(base), "judge": judge_path(base)}
    if not is_complete(stages["judge"]):
        raise UserError(f"the base run {base} has no finished judge at {stages['judge']}; a study judges every "
                        "variant with the base run's judge: train it with train_all.py (without --skip-eval)")
    for stage, folder in stages.items():
        read_stage(folder, stage_kind(stage))
    return stages


def _recorded(folder: Path, stage: str) -> tuple[dict[str, Any], str]:
    """A finished stage's ``stage_settings``, and the preset it was built on."""
    data = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    return stage_settings(stage, data["training"]), data.get("preset", {}).get("name") or choose_preset(None)


def _phase_metric(folder: Path, key: str) -> float | None:
    path = folder / METRICS_FILE
    return json.loads(path.read_text(encoding="utf-8")).get(key) if path.is_file() else None


def _stage_total(folder: Path, key: str) -> float | None:
    """A finished stage's training ``minutes`` or ``steps``; a progressive UNet's include its low-resolution
    phase's."""
    total, lowres = _phase_metric(folder, key), _phase_metric(lowres_folder(folder), key)
    return total if total is None or lowres is None else total + lowres


def estimate_minutes(stage: str, base_folder: Path, recorded: dict[str, Any], cfg: Any) -> float | None:
    """Training minutes of ``cfg``: the base stage's, per phase, scaled by epochs. ``None`` when a phase the
    config trains has no recorded base minutes (a base UNet without a low-resolution phase, for one)."""
    phases = [(base_folder, recorded.get("train.epochs"), cfg.train.epochs)]
    if stage == "unet" and cfg.lowres_epochs > 0:
        phases.append((lowres_folder(base_folder), recorded.get("lowres_epochs"), cfg.lowres_epochs))
    total = 0.0
    for folder, base_epochs, epochs in phases:
        minutes = _phase_metric(folder, "minutes")
        if minutes is None or not base_epochs:
            return None
        total += minutes * epochs / base_epochs
    return total


def plan_column(variant: Variant, base: dict[str, Path], out: Path, concurrent: bool) -> ColumnPlan:
    """Which stages the variant trains, takes from a folder or reuses from the base; configs and shapes checked."""
    trained = {stage for stage in STUDY_STAGES if variant.overrides[stage]}
    for stage in set(variant.folders) | set(trained):
        trained |= {down for down in DOWNSTREAM[stage] if down not in variant.folders}
    folder = out / variant.name
    stages, sources, configs, presets = {"judge": base["judge"]}, {}, {}, {}
    estimate: float | None = 0.0
    for stage in STUDY_STAGES:
        if stage in variant.folders:
            try:
                read_stage(variant.folders[stage], stage)
            except StageError as err:
                raise StageError(f"variant {variant.name}: {err}") from None
            stages[stage], sources[stage] = variant.folders[stage], "given"
            continue
        if stage not in trained:
            stages[stage], sources[stage] = base[stage], "base"
            continue
        recorded, preset = _recorded(base[stage], stage)
        cfg = train_all.stage_config(stage, preset, {**recorded, **variant.overrides[stage]})
        if variant.overrides[stage] and not setting_differences(stage_settings(stage, cfg), recorded,
                                                                unrecorded_values(cfg)):
            raise UserError(f"variant {variant.name}: its --{stage}.* overrides are the base's own {stage} settings "
                            "or only change how training runs, so nothing it learns would differ; change a value, or "
                            "drop them")
        if concurrent:
            cfg.train.compile = False  # several compiles at once would spend the budget on the CPU
        stages[stage], sources[stage] = folder / stage, "trained"
        configs[stage], presets[stage] = cfg, preset
        minutes = estimate_minutes(stage, base[stage], recorded, cfg)
        estimate = None if estimate is None or minutes is None else estimate + minutes
    check_column_fit(variant.name, stages, configs)
    changed = tuple(s for s in STUDY_STAGES if s in variant.folders or variant.overrides[s])
    return ColumnPlan(name=variant.name, spec=variant.spec, folder=folder, stages=stages, sources=sources,
                      configs=configs, presets=presets, estimate_minutes=estimate, changed=changed)


def check_column_fit(name: str, stages: dict[str, Path], configs: dict[str, Any]) -> None:
    """The shape check of ``load_stack`` on what the column will hold, before anything trains."""
    where = {stage: f"of variant {name} (--{stage}.*)" if stage in configs else f"at {stages[stage]}"
             for stage in STUDY_STAGES}
    try:
        train_all.check_planned_fit(configs, stages, where)
    except StageError as err:
        raise StageError(f"variant {name}: {err}") from None


def check_unet_resolutions(plans: Sequence[ColumnPlan], size: int) -> None:
    """Without ``--size`` every column draws at the base UNet's resolution; a column whose UNet learnt another one
    would be judged off its training distribution, so that needs the user's explicit choice of one size."""
    for plan in plans:
        cfg = plan.configs.get("unet")
        resolution = cfg.resolution if cfg is not None else \
            read_stage(plan.stages["unet"], "unet").training["resolution"]
        if resolution != size:
            raise UserError(f"variant {plan.name}'s UNet {'trains' if cfg is not None else 'was trained'} at "
                            f"{resolution} px but the study draws every column at the base UNet's {size} px; pass "
                            "--size to choose the one size every column is drawn at")


def check_column_sizes(plans: Sequence[ColumnPlan], size: int, default: int) -> None:
    """Every column draws at ``size``: it must fit each variant's VAE and UNet, trained or about to be (the
    planned configs), before anything trains."""
    for plan in plans:
        models = [config_to_dict(plan.configs[stage].model) if stage in plan.configs else
                  read_stage(plan.stages[stage], stage).model for stage in ("vae", "unet")]
        try:
            sampling_size(size, *models, default)
        except UserError as err:
            raise UserError(f"variant {plan.name}: {err}") from None


def base_column(base: dict[str, Path], out: Path) -> ColumnPlan:
    return ColumnPlan(name=BASE, spec="", folder=out / BASE, stages=dict(base),
                      sources={stage: "base" for stage in STUDY_STAGES}, configs={}, presets={}, estimate_minutes=0.0,
                      changed=())


def check_base_data(base: dict[str, Path], data: str) -> None:
    """The base UNet must have been trained on ``data``: reused stages and retrained ones then see the same; and
    ``data`` must be large enough to evaluate on."""
    info = read_stage(base["unet"], "unet")
    captions = load_captions(data, resolution=info.training["resolution"])
    check_evaluation_data(captions.subset("val"))
    if info.trained_on.get("data") != captions.fingerprint:
        raise UserError(f"the base UNet at {base['unet']} was trained on other data than --data {data}; pass the "
                        "data the base run was trained on")


def check_column_folder(plan: ColumnPlan, recorded_as: dict[str, Any], data: str) -> None:
    """A column folder left by an earlier run must be this column: same spec and evaluation, and finished
    stages that match what the variant asks (otherwise resuming would mix two studies)."""
    path = plan.folder / VARIANT_FILE
    if path.is_file():
        earlier = json.loads(path.read_text(encoding="utf-8"))["recorded_as"]
        keys = list(recorded_as) + [key for key in earlier if key not in recorded_as]  # given then, left out now
        differences = [f"{key} was {earlier.get(key)!r}, now {recorded_as.get(key)!r}" for key in keys
                       if earlier.get(key) != recorded_as.get(key)]
        if differences:
            raise UserError(f"{plan.folder} holds column {plan.name} of another study ({'; '.join(differences)}); "
                            "write to another --out, give the variant another name, or delete that folder")
    will_train: set[str] = set()
    for stage, cfg in plan.configs.items():
        folder = plan.stages[stage]
        if not is_complete(folder):
            will_train.add(stage)
            continue
        upstream = {s: None if s in will_train else plan.stages[s] for s in ("vae", "clip")} if stage == "unet" else {}
        derived = derived_inputs(cfg, data, upstream) if stage == "unet" else {}  # its captions, colour sentences
        differences = finished_stage_differences(stage, folder, cfg, data, upstream, derived)
        if differences:
            raise StageError(f"{folder} holds a finished {stage} stage that differs from variant {plan.name} "
                             f"({'; '.join(differences[:3])}); delete {plan.folder} to train the variant again")


def train_column(plan: ColumnPlan, data: str, device: str | None) -> None:
    """Train (or resume) the column's stages in order into its folder; every rank runs this under torchrun."""
    for stage in STUDY_STAGES:
        if stage not in plan.configs or is_complete(plan.stages[stage]):
            continue
        train_all.train_stage(stage, plan.configs[stage], plan.folder, data, plan.stages, device)
        if distributed.is_main():
            record_preset(plan.stages[stage], plan.presets[stage], "the base stage's preset")


def _train_column_logged(plan: ColumnPlan, data: str, device: str | None, log: Path, threads: int) -> None:
    """``train_column`` in a process of its own, its output in ``log`` (the target of ``--concurrent``)."""
    torch.set_num_threads(threads)  # the processes share the CPU: each taking every core would oversubscribe it
    with open(log, "a", encoding="utf-8", buffering=1) as fh, contextlib.redirect_stdout(fh), \
            contextlib.redirect_stderr(fh):
        train_column(plan, data, device)


def train_concurrently(plans: Sequence[ColumnPlan], data: str, device: str | None) -> None:
    """Train every column at once, one process each, and wait for all; a failure names the column's log."""
    context = torch.multiprocessing.get_context("spawn")
    processes = []
    threads = max(1, (os.cpu_count() or 1) // max(1, len(plans)))
    for plan in plans:
        log = plan.folder / "train.log"
        process = context.Process(target=_train_column_logged, args=(plan, data, device, log, threads))
        process.start()
        processes.append((plan.name, process, log))
        print(f"training {plan.name} in its own process: {log}", flush=True)
    failed = []
    for name, process, log in processes:
        process.join()
        if process.exitcode != 0:
            failed.append(f"{name} (see {log})")
    if failed:
        raise RuntimeError("these variants failed to train: " + ", ".join(failed))


def evaluate_column(plan: ColumnPlan, judge: CLIPModel, data: CaptionSet, reference: RealReference, size: int,
                    steps: int, eval_seeds: int, device: str | None, guidance: float | None = None,
                    guidance_interval: tuple[float, float] | None = None,
                    condition_noise: Sequence[float] | None = DEFAULT_CONDITION_NOISE) -> dict[str, Any]:
    """The column's evaluation (``eval_seeds`` draws of the sampled metrics: mean and spread) and grid block.
    ``data`` at ``size`` px and its ``reference`` are the study's, shared by every column. ``guidance``: the
    scale of every column; None takes the column's UNet config's (its grids' scale). ``guidance_interval``: the
    noise levels guided (None: every level, as the grids). ``condition_noise``: the study's recorded one."""
    stack = load_stack(vae=plan.stages["vae"], clip=plan.stages["clip"], unet=plan.stages["unet"], device=device)
    training = stack.infos["unet"].training
    settings = GenerationSettings(size=size, steps=steps, guidance_rescale=training["guidance_rescale"],
                                  guidance_scale=training["guidance_scale"] if guidance is None else guidance,
                                  guidance_interval=guidance_interval, condition_noise=condition_noise)
    results = evaluate_run(stack, data, judge, settings, out_dir=plan.folder,
                           judge_name=describe_judge(plan.stages["judge"]), reference=reference)
    draws = [results["generation"]] + [
        generation_metrics(stack, judge, data.subset("train"), data.subset("val"), settings,
                           seed_offset=k * SEED_SET_STRIDE, reference=reference, records=results["samples"])
        for k in range(1, eval_seeds)]  # every set's sample records: the columns are compared sample for sample
    summary = over_seed_sets(draws)
    results["generation"] = summary["mean"]
    if "sd" in summary:
        results["generation_sd"] = summary["sd"]
    results["generation_draws"] = draws
    results["train_minutes"] = {stage: _stage_total(plan.stages[stage], "minutes") for stage in STUDY_STAGES}
    results["train_steps"] = {stage: _stage_total(plan.stages[stage], "steps") for stage in STUDY_STAGES}
    draw_showcase(stack, settings, plan.folder / GRID_BLOCK_FILE, seeds=GRID_SEEDS, tile=96)
    write_json(plan.folder / EVALUATION_FILE, results)
    return results


# ---- the report -------------------------------------------------------------------------------------------------

def metric_value(results: dict[str, Any], section: str, key: str) -> float | None:
    value = results.get(section, {}).get(key)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def metric_spread(results: dict[str, Any], section: str, key: str) -> float | None:
    return results.get("generation_sd", {}).get(key) if section == "generation" else None


def metric_error(results: dict[str, Any], section: str, key: str) -> float | None:
    """A sampled metric's spread over seed sets, or, with one seed set, a share's binomial standard error."""
    spread = metric_spread(results, section, key)
    return spread if spread is not None or section != "generation" else share_error(results["generation"], key)


def format_value(value: float, share: bool) -> str:
    return f"{100 * value:.0f} %" if share else f"{value:.3g}"


def format_difference(difference: float, share: bool) -> str:
    return f"{100 * difference:+.0f} pts" if share else f"{difference:+.3g}"


def describe_column(plan: ColumnPlan, base: dict[str, Any], results: dict[str, Any]) -> tuple[str, str]:
    """(one sentence of what the column changed against ``base``, the reference column's results, from the
    numbers; its largest change, for the headline)."""
    trained = [s for s in STUDY_STAGES if plan.sources[s] == "trained"]
    given = [s for s in STUDY_STAGES if plan.sources[s] == "given"]
    what = "; ".join(filter(None, [f"retrained {', '.join(trained)}" if trained else "",
                                   f"took {', '.join(given)} from a folder" if given else ""])) or "the base run"
    changes = []  # (beyond the seed spread, relative size, text)
    for section, key, label, share in KEY_METRICS:
        before, after = metric_value(base, section, key), metric_value(results, section, key)
        if before is None or after is None or before == after:
            continue
        text = f"{label} {format_value(before, share)} → {format_value(after, share)}"
        if section == "generation":
            spreads = [metric_spread(r, section, key) for r in (base, results)]
            if None not in spreads:
                beyond = abs(after - before) > 2 * max(spreads)
            elif None not in (errors := [share_error(r["generation"], key) for r in (base, results)]):
                # one seed set, a share: its binomial noise decides
                beyond = abs(after - before) > 2 * math.hypot(*errors)
                text += "" if beyond else " (within binomial noise)"
            else:
                beyond = None
        else:  # reconstruction and retrieval are not sampled: every change is the variant's
            beyond = True
        relative = abs(after - before) / max(abs(before), abs(after))
        changes.append((beyond, relative, text))
    if not changes:
        return f"**{plan.name}** ({what}): no key metric changed.", f"{plan.name}: no key metric changed"
    changes.sort(key=lambda c: (c[0] is False, -c[1]))  # largest first, a share's change within its noise last
    largest = changes[0][2]
    if any(c[0] is None for c in changes):  # one seed set: only the shares have a noise to be tested against
        return (f"**{plan.name}** ({what}): {', '.join(c[2] for c in changes[:3])} (one seed set: the spread "
                "over seeds of the metrics other than shares was not measured).", f"{plan.name}: {largest}")
    moved = [c for c in changes if c[0]]
    if not moved:
        return (f"**{plan.name}** ({what}): no key metric moved by more than twice its spread over seeds (largest "
                f"change: {largest}).", f"{plan.name}: no change beyond the seed spread")
    return f"**{plan.name}** ({what}): {', '.join(c[2] for c in moved[:3])}.", f"{plan.name}: {moved[0][2]}"


def metrics_markdown(plans: Sequence[ColumnPlan], evaluations: dict[str, dict[str, Any]], reference: str = BASE) -> str:
    """Rows: key metrics and training minutes; columns: real images, then every column, each but ``reference``
    with its difference from that column."""
    names = [p.name for p in plans]
    base = evaluations[BASE]
    lines = ["| metric | real images | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for section, key, label, share in KEY_METRICS:
        if all(metric_value(evaluations[n], section, key) is None for n in names):
            continue
        real = metric_value(base, section, real_key(key))
        cells = [format_value(real, share) if real is not None else "—"]
        for name in names:
            value = metric_value(evaluations[name], section, key)
            if value is None:
                cells.append("—")
                continue
            text = format_value(value, share)
            spread = metric_error(evaluations[name], section, key)
            if spread is not None:
                text += f" ± {format_difference(spread, share).lstrip('+')}"
            before = metric_value(evaluations[reference], section, key)
            if name != reference and before is not None:
                text += f" ({format_difference(value - before, share)})"
            cells.append(text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for stage in STUDY_STAGES:
        for record, unit, form in (("train_steps", "steps", "{:,.0f}"), ("train_minutes", "minutes", "{:.1f}")):
            cells = []
            for plan in plans:
                value = evaluations[plan.name].get(record, {}).get(stage)  # steps: absent before they were kept
                source = plan.sources[stage]
                note = "" if source == "trained" else f" ({source})"
                cells.append(("—" if value is None else form.format(value)) + note)
            lines.append(f"| {stage} training {unit} | — | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def combined_grid(plans: Sequence[ColumnPlan], path: Path, gap: int = 12, label_height: int = 14) -> Path:
    """The columns' grid blocks side by side, each under its name, with a white gap between blocks."""
    blocks = [Image.open(plan.folder / GRID_BLOCK_FILE).convert("RGB") for plan in plans]
    width = sum(b.width for b in blocks) + gap * (len(blocks) - 1)
    canvas = Image.new("RGB", (width, max(b.height for b in blocks) + label_height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for plan, block in zip(plans, blocks):
        canvas.paste(block, (x, label_height))
        draw.text((x + 2, 1), plan.name, fill="black")
        x += block.width + gap
    canvas.save(path)
    return path


def _loss_curve(folder: Path) -> tuple[list[int], list[float]]:
    records = [r for r in read_records(folder / "log.jsonl") if r.get("kind") == "train" and "train/loss" in r]
    return [r["step"] for r in records], [r["train/loss"] for r in records]


def plot_losses(plans: Sequence[ColumnPlan], path: Path) -> Path | None:
    """Training loss per step of every stage some column changed, one line per distinct stage folder."""
    import matplotlib.pyplot as plt  # engine.runlog chose the Agg backend

    varied = [s for s in STUDY_STAGES if len({str(p.stages[s]) for p in plans}) > 1]
    if not varied:
        return None
    fig, axes = plt.subplots(1, len(varied), figsize=(5 * len(varied), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], varied):
        users: dict[str, list[str]] = {}
        for plan in plans:
            users.setdefault(str(plan.stages[stage]), []).append(plan.name)
        for folder, names in users.items():
            steps, losses = _loss_curve(Path(folder))
            if steps:
                ax.plot(steps, losses, label=" = ".join(names), linewidth=1)
        ax.set_title(f"{stage} training loss")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metrics(plans: Sequence[ColumnPlan], evaluations: dict[str, dict[str, Any]], path: Path) -> Path:
    """One small bar chart per key metric: a bar per column (± the spread over seeds), the real images dashed."""
    import matplotlib.pyplot as plt  # engine.runlog chose the Agg backend

    shown = [m for m in KEY_METRICS if any(metric_value(evaluations[p.name], m[0], m[1]) is not None for p in plans)]
    columns = 4
    rows = math.ceil(len(shown) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    names = [p.name for p in plans]
    for ax, (section, key, label, _) in zip(axes.flat, shown):
        values = [metric_value(evaluations[n], section, key) for n in names]
        spreads = [metric_spread(evaluations[n], section, key) or 0.0 for n in names]
        ax.bar(range(len(names)), [math.nan if v is None else v for v in values],
               color=[f"C{i}" for i in range(len(names))], yerr=spreads if any(spreads) else None, capsize=3)
        real = metric_value(evaluations[BASE], section, real_key(key))
        if real is not None:
            ax.axhline(real, linestyle="--", color="black", linewidth=1)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
        ax.set_title(label, fontsize=9)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def paired_section(plans: Sequence[ColumnPlan], evaluations: dict[str, dict[str, Any]], reference: str
                   ) -> list[str]:
    """Report lines: each column against ``reference`` sample for sample (the same prompts and seeds), where both
    evaluations recorded their samples; none otherwise."""
    paired = paired_against(evaluations[reference].get("samples", []),
                            {p.name: evaluations[p.name].get("samples", []) for p in plans if p.name != reference})
    if not paired:
        return []
    return ["## Sample for sample", "", f"Each column against {reference} on the samples both drew (the same "
            "prompt or caption, and seed): the shares before → after, the pairs where only one side has the flag, "
            "McNemar's exact p-value, and the parts' paired difference with its standard error beside the unpaired "
            "one.", "", paired_table(paired)]


def write_report(out: Path, plans: Sequence[ColumnPlan], evaluations: dict[str, dict[str, Any]],
                 settings: dict[str, Any], command: str, reference: str = BASE) -> dict[str, Any]:
    """``OUT/report.md``, the pictures and ``OUT/study.json`` (with the fields of a studies summary entry).
    ``reference``: the column the others are measured against, in the sentences and the table (default: base)."""
    variants = [p for p in plans if p.name != BASE]
    compared = [p for p in plans if p.name != reference]
    sentences = {p.name: describe_column(p, evaluations[reference], evaluations[p.name]) for p in compared}
    compare = combined_grid(plans, out / "compare.png")
    losses = plot_losses(plans, out / "losses.png")
    bars = plot_metrics(plans, evaluations, out / "metrics.png")
    preset = {plan.presets.get(s) for plan in plans for s in plan.presets} or {
        json.loads((plans[0].stages["unet"] / CONFIG_FILE).read_text(encoding="utf-8")).get("preset", {}).get("name")}
    spread_note = (f"± is the standard deviation over {settings['eval_seeds']} seed sets; a change within twice "
                   "it is noise" if settings["eval_seeds"] > 1 else
                   "one seed set: a share (near-copies, frame filling, colour adherence) carries ± one binomial "
                   "standard error over the samples drawn, and a difference within twice the two combined is noise; "
                   "the other metrics' spread over seeds was not measured (pass --eval-seeds 3 for it)")
    lines = [f"# Study: {out.name}", "", f"Command: `{command}`", "",
             f"Base run `{settings['base']}`; data `{settings['data']}`; judge `{settings['judge']}` (the base run's, "
             f"for every column). Every column samples the same prompts and seeds: {settings['steps']} steps at "
             f"{settings['size']} px, " + (f"guidance {settings['guidance']:g}" if "guidance" in settings else
                                           "with the guidance scale of its UNet's config") +
             (" in the noise-level interval ({:g}, {:g}]".format(*settings["guidance_interval"])
              if "guidance_interval" in settings else " at every noise level") +
             ", with the guidance rescale of its UNet's config and generation's default step noise (eta {:g} at the "
             "levels sigma <= {:g}) ".format(*DEFAULT_STEP_NOISE) +
             ("and condition noise ({:g} from sigma {:g}, all noise from {:g}).".format(*settings["condition_noise"])
              if settings.get("condition_noise") else "without condition noise."), ""]
    if "tiny" in preset:
        lines += ["**This is a smoke study** on the tiny preset: it shows that the study runs end to end; its "
                  "numbers say nothing about the full models.", ""]
    heading = "What each variant changed" if reference == BASE else f"What each column changed against {reference}"
    lines += [f"## {heading}", ""] + [f"- {sentences[p.name][0]}" for p in compared] + [""]
    histories = {p.name: train_all.stage_spikes({s: p.stages[s] for s in STUDY_STAGES}) for p in plans}
    spikes, rolled_back, cudnn_off = ({name: kinds[i] for name, kinds in histories.items() if kinds[i]}
                                      for i in range(3))

    def section(title: str, intro: str, by_column: dict[str, train_all.SpikesByPhase],
                describe: Callable[[str, list[dict[str, Any]]], str]) -> list[str]:
        """A heading, its sentence and a line per column, ``describe(phase, spikes)`` for each of its phases."""
        if not by_column:
            return []
        return [f"## {title}", "", intro, ""] + [
            f"- **{name}**: " + "; ".join(describe(phase, found) for phase, found in phases.items())
            for name, phases in by_column.items()] + [""]

    lines += section("Loss spikes", "These columns' training spiked (the trainer's rule: a log interval's mean "
                     f"gradient norm {SPIKE_FACTOR:g}x its level before). A stage that did not recover draws worse "
                     "than a clean run of the same settings, so its difference from the base may be the spike's, not "
                     "the variant's.", spikes, lambda phase, found: f"{phase} at {train_all.spike_steps(found)}")
    lines += section("Spikes rolled back", "These columns' trainers went back past a spike and trained on, at a "
                     "lower learning rate unless cuDNN's attention made the spike (then without it): a difference "
                     "from the base may come from that.", rolled_back, lambda phase, found: "; ".join(
                         f"{phase} at {train_all.spike_steps([r])}, back to step {r['step']}, learning rate "
                         f"x{r['lr_scale']:.3g} after" + (", cuDNN's attention off" if r.get("cudnn_attention_off")
                                                          else "") for r in found))
    lines += section("cuDNN's attention turned off", "These columns' trainers met non-finite gradients from cuDNN's "
                     "attention with no rollback left: the steps were skipped and the rest of the stage trained "
                     "without it.", cudnn_off, lambda phase, found: f"{phase} at {train_all.spike_steps(found)}")
    fits = {p.name: train_all.unet_fit(p.stages["unet"]) for p in plans}
    if any(fits.values()):
        lines += ["## The UNet's fit", "", "Each column's validation loss (fixed noise and timesteps, EMA weights) "
                  "per UNet phase, with the same measure on as many training images at the end: a validation loss "
                  "that ended above its lowest while the training images' fell is a UNet fitting its training "
                  "images rather than their distribution.", "",
                  "| column | phase | validation loss |", "|---|---|---|"]
        lines += [f"| {name} | {phase} | {train_all.fit_sentence(found)} |"
                  for name, fit in fits.items() for phase, found in fit.items()]
        lines.append("")
    lines += ["## Columns", "", "| column | variant | vae | clip | unet |", "|---|---|---|---|---|"]
    for plan in plans:
        cells = [f"trained ({plan.stages[s].name})" if plan.sources[s] == "trained" else
                 f"given: `{plan.stages[s]}`" if plan.sources[s] == "given" else "base" for s in STUDY_STAGES]
        lines.append(f"| {plan.name} | `{plan.spec or '(the base run)'}` | " + " | ".join(cells) + " |")
    lines += ["", "## Metrics", "", f"Differences in brackets are column − {reference}; {spread_note}. Real images: "
              "the data's own value where the metric has one. Training minutes are wall-clock: columns trained at once "
              "(`--concurrent`) or beside other work shared the GPU, so their steps compare budgets better.", "",
              metrics_markdown(plans, evaluations, reference), *paired_section(plans, evaluations, reference),
              "## Samples", "", f"Column blocks, left to right: {', '.join(p.name for p in plans)}; in each block, "
              f"{showcase_layout(GRID_SEEDS)}.",
              "", "![compare](compare.png)", ""]
    if losses is not None:
        lines += ["## Loss curves", "", "Training loss of the stages that differ (a line shared by several "
                  "columns is one stage folder).", "", "![losses](losses.png)", ""]
    lines += ["## Key metrics", "", "Bars: columns (± spread over seeds); dashed: real images.", "",
              f"![metrics]({bars.name})", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    summary = {"stage": ", ".join(dict.fromkeys(s for p in variants for s in p.changed)),
               "variants": {p.name: {"spec": p.spec, "sources": p.sources, "sentence": sentences.get(p.name, ("",))[0]}
                            for p in variants},
               "reference": reference,
               "compare_png": str(compare), "headline": "; ".join(sentences[p.name][1] for p in compared) + ".",
               "command": command, "settings": settings, "loss_spikes": spikes, "spike_rollbacks": rolled_back,
               "cudnn_attention_off": cudnn_off,
               "unet_fit": {name: train_all.fit_summary(fit) for name, fit in fits.items()},
               "evaluations": {name: {k: evaluations[name].get(k) for k in SUMMARY_KEYS} for name in evaluations}}
    write_json(out / "study.json", summary)
    return summary


# ---- the command ------------------------------------------------------------------------------------------------

def print_plan(plans: Sequence[ColumnPlan], pending: set[str], settings: dict[str, Any],
               evaluate_minutes: float | None) -> None:
    print(f"Study plan: base {settings['base']} (judge {settings['judge']}), {len(plans)} columns, "
          f"{settings['eval_seeds']} seed set(s), {settings['steps']} steps at {settings['size']} px", flush=True)
    training = 0.0
    for plan in plans:
        stages = "  ".join(f"{s} {plan.sources[s].upper() if plan.sources[s] == 'trained' else plan.sources[s]:<7}"
                           for s in STUDY_STAGES)
        if plan.name not in pending:
            note = "finished: skipped"
        elif not plan.configs:
            note = "evaluation only"
        elif plan.estimate_minutes is None:
            note = "training time unknown (the base stages record no minutes)"
        else:
            note = f"about {plan.estimate_minutes:.1f} min of training"
            training += plan.estimate_minutes
        print(f"  {plan.name:<16} {stages}  {note}", flush=True)
    evaluation = "" if evaluate_minutes is None else \
        f" + about {evaluate_minutes * settings['eval_seeds'] * len(pending):.1f} min of evaluation"
    print(f"Estimate: about {training:.1f} min of training one after another (the base run's minutes; "
          f"--concurrent overlaps them){evaluation}", flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    description, _, usage_notes = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(prog="python -m pipelines.study", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=usage_notes)
    add_debug_flag(parser)
    parser.add_argument("--base", type=Path, required=True, help="finished run (train_all.py) the variants start from")
    parser.add_argument("--data", required=True, help="the captions source the base run was trained on")
    parser.add_argument("--out", type=Path, required=True, help="study folder, e.g. runs/study_NAME")
    parser.add_argument("--variant", action="append", required=True,
                        help="'NAME: --STAGE.key=value ... STAGE=FOLDER ...' (repeatable)")
    parser.add_argument("--eval-seeds", type=int, default=1, help="seed sets of the sampled metrics (spread if > 1)")
    parser.add_argument("--steps", type=int, default=GenerationSettings().steps, help="sampling steps")
    parser.add_argument("--size", type=int,
                        help=f"{SIZE_HELP}, for every column (default: the base UNet's training resolution)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance scale of every column (default: each UNet config's, the training grids' scale)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, metavar=("SIGMA_LO", "SIGMA_HI"),
                        help="guide only at noise levels in (SIGMA_LO, SIGMA_HI] (default: every level, as the grids)")
    parser.add_argument("--reference", default=BASE, metavar="COLUMN",
                        help="the column the report measures the others against (default: base); run a finished "
                             "study again with another to re-read it without training")
    parser.add_argument("--concurrent", action="store_true", help="train the variants at once, one process each")
    parser.add_argument("--plan-only", action="store_true", help="print the plan and stop")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    # Every mistake in what was asked surfaces here, before anything trains.
    variants = [parse_variant(text) for text in args.variant]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise UserError(f"variant names must differ, got {names}")
    if args.reference not in [BASE, *names]:
        raise UserError(f"--reference {args.reference} is no column of this study; pass {BASE} or a variant's name "
                        f"({', '.join(names)})")
    check_counts(args, "--eval-seeds")
    if args.concurrent and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--concurrent runs one process per variant on one GPU; under torchrun the variants train "
                        "one after another on every rank: drop --concurrent")
    if args.out.resolve() == args.base.resolve() or (args.out / "summary.json").is_file():  # train_all's record
        raise UserError(f"--out {args.out} is a run's folder: the study's report.md would replace the run's; pass a "
                        "folder of the study's own, e.g. runs/study_NAME")
    check_folder_path(args.out, "--out")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # under torchrun each rank's device is set up with its group
        distributed.resolve_device(args.device)
    base = base_stages(args.base)
    infos = {stage: read_stage(base[stage], stage) for stage in ("vae", "unet")}
    default_size = generation_size(infos)
    size = sampling_size(args.size, infos["vae"].model, infos["unet"].model, default_size)  # variants': below
    GenerationSettings(size=size, steps=args.steps,  # checks size, steps and a given guidance and interval
                       guidance_scale=GenerationSettings.guidance_scale if args.guidance is None else args.guidance,
                       guidance_interval=args.guidance_interval)
    check_base_data(base, args.data)
    plans = [base_column(base, args.out)] + [plan_column(v, base, args.out, args.concurrent) for v in variants]
    if args.size is None:
        check_unet_resolutions(plans, size)
    check_column_sizes(plans[1:], size, default_size)
    settings = {"base": str(args.base), "data": args.data, "judge": str(base["judge"]), "steps": args.steps,
                "size": size, "eval_seeds": args.eval_seeds}
    if args.guidance is not None:  # recorded only when given, so columns of studies made before the option resume
        settings["guidance"] = args.guidance
    if args.guidance_interval is not None:
        settings["guidance_interval"] = args.guidance_interval
    # generation's default, recorded: a study resumed after that default moved stops instead of mixing columns
    settings["condition_noise"] = list(DEFAULT_CONDITION_NOISE)
    command = command_line("python -m pipelines.study", argv)
    is_main = int(os.environ.get("RANK", "0")) == 0  # the process group does not exist yet: torchrun's rank
    # one study writes to a folder at a time, from reading its columns to writing its report: a second one would
    # resume the first one's half-trained columns, or evaluate again one the first has just finished
    with folder_lock(args.out, command) if is_main and not args.plan_only else contextlib.nullcontext():
        return run_study(args, plans, settings, base, size, command, is_main)


def run_study(args: argparse.Namespace, plans: list[ColumnPlan], settings: dict[str, Any], base: dict[str, Path],
              size: int, command: str, is_main: bool) -> dict[str, Any]:
    """Read the columns' folders and print the plan; then, unless ``--plan-only``, train and evaluate the pending
    columns and write the report. Called with the study folder held."""
    for plan in plans:
        check_column_folder(plan, {"spec": plan.spec, **settings}, args.data)
    pending = {p.name for p in plans if not (p.folder / EVALUATION_FILE).is_file()}
    base_summary = args.base / "summary.json"
    evaluate_minutes = json.loads(base_summary.read_text(encoding="utf-8")).get("stage_minutes", {}).get(
        "evaluate") if base_summary.is_file() else None
    result: dict[str, Any] = {"sources": {p.name: p.sources for p in plans}, "pending": sorted(pending),
                              "estimate_minutes": {p.name: p.estimate_minutes for p in plans}, "settings": settings}
    if is_main:
        print_plan(plans, pending, settings, evaluate_minutes)
    if args.plan_only:
        return result
    env = distributed.setup(args.device)
    try:
        to_train = [p for p in plans if p.name in pending and p.configs]
        if env.is_main:
            for plan in plans:
                if plan.name in pending:
                    write_json(plan.folder / VARIANT_FILE, {"recorded_as": {"spec": plan.spec, **settings},
                                                            "sources": plan.sources})  # stages: stages.json
                    write_stages_record(plan.folder, plan.stages)
                else:
                    print(f"{plan.name}: finished ({plan.folder / EVALUATION_FILE}), skipped", flush=True)
        distributed.barrier()
        started = time.perf_counter()
        if args.concurrent:
            train_concurrently(to_train, args.data, args.device)
        else:
            for plan in to_train:
                if env.is_main:
                    print(f"\n=== {plan.name}: training {', '.join(plan.configs)} ===", flush=True)
                train_column(plan, args.data, args.device)
        distributed.barrier()
        result["train_minutes"] = (time.perf_counter() - started) / 60
        if env.is_main:
            judge = CLIPModel.load(base["judge"], device=env.device).eval()
            data = load_captions(args.data, resolution=size)
            reference = real_reference(judge, data.subset("train"), data.subset("val"), size) if pending else None
            evaluations = {}
            for plan in plans:
                if plan.name in pending:
                    print(f"\n=== {plan.name}: evaluating ===", flush=True)
                    evaluations[plan.name] = evaluate_column(plan, judge, data, reference, size, args.steps,
                                                             args.eval_seeds, str(env.device), args.guidance,
                                                             args.guidance_interval, settings["condition_noise"])
                else:
                    evaluations[plan.name] = json.loads((plan.folder / EVALUATION_FILE).read_text(encoding="utf-8"))
            result["summary"] = write_report(args.out, plans, evaluations, settings, command,
                                             args.reference)
            print(f"\nStudy written: {args.out / 'report.md'}", flush=True)
        distributed.barrier()
    finally:
        distributed.cleanup()
    return result


if __name__ == "__main__":
    run_cli(main)

"""Choose the sampling defaults from measurements: one trained run, the picture-quality ruler of
``pipelines.evaluate`` at every combination of guidance scale, guidance rescale, guidance interval, the scale above
it (``--guidance-above``: the highest noise levels guided at a scale of their own, not left to the prompt alone),
steps, their spacing (``--timestep-spacing trailing karras``), step noise (eta, for the ddim and dpmpp_2m samplers,
at every step or below a noise level), condition noise (CADS: the prompt annealed with noise at the high noise levels)
and autoguidance (``--guide-unet``, a weaker UNet on the run's VAE and CLIP, at each ``--autoguidance`` scale,
beside classifier-free guidance).

    python -m benchmarks.sampling_sweep --run runs/pokemon --data ../shared/pokemon --out runs/sweep.json \\
        --guidance 2 3 4 --rescale 0.7 --steps 25 --interval none 0.28,7.5 --eta 0 0.5 --eta-sigma-max none 2 \\
        --condition-noise none 0.25,3,15

The judge is the run's (``judge/``, or the one its ``stages.json`` names). ``--seed-sets N`` draws each setting N
times with disjoint seeds (the study's seed sets): a record's ``metrics`` are their mean, ``metrics_sd`` the spread
over the sets. Every setting draws the same prompts and seeds, so each after the first is also measured against
the first sample for sample (``paired_with_first``: ``pipelines.evaluate.paired_differences``), which tells a
smaller difference from noise than two means do. Each drawn record keeps its ``samples`` (every sample's prompt or
validation row, seed and verdicts, as an ``evaluation.json`` does) and the JSON names its judge, so a setting also
pairs with another run's evaluation or sweep of the same prompts and seeds (``python -m pipelines.paired
sweep.json:N OTHER``). Writes one JSON record per setting and prints a table;
``--showcase DIR`` also draws each setting's picture, the showcase prompts x 4 seeds as in a run's
``final_samples.png`` (``DIR/setting_NN.png``, listed with their settings in ``DIR/showcase.md``), so that a
setting is judged by eye as well as by its figures. A setting whose noise-level bounds (guidance interval, step
noise limit) select the same sampling steps as an earlier one draws the same samples, so it is not drawn again:
its record repeats the earlier one's figures (and ``paired_with_first``, absent for a repeat of the first setting)
with ``same_samples_as``, and the sweep prints the steps' noise levels first, to choose bounds between them.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path
from typing import Sequence

import torch

from clip.model import CLIPModel
from data import load_captions
from diffusion.guidance import has_levels_above, is_guided, step_guidance
from diffusion.samplers import step_etas
from diffusion.schedule import TIMESTEP_SPACINGS, NoiseSchedule
from engine.cli import check_counts, check_output_file, command_line
from engine.errors import UserError, add_debug_flag, run_cli
from engine.stage import check_folder_path, write_json
from pipelines.evaluate import (SEED_SET_STRIDE, describe_judge, generation_metrics, over_seed_sets,
                                paired_differences, real_reference)
from pipelines.stages import check_guide, judge_path, load_stack, stack_infos
from pipelines.text_to_image import (DEFAULT_CONDITION_NOISE, DEFAULT_STEP_NOISE, GenerationSettings,
                                     default_step_noise, draw_showcase, showcase_layout)

SHOWN = ("fg_share", "border_fg", "frame_filling_share", "parts_mean", "near_copy_share_pixel",
         "near_copy_share_pixel_relative", "near_copy_share_pixel_hue_blind", "near_copy_share_silhouette",
         "near_copy_share_judge", "near_copy_share_judge_colour_prompts", "colour_adherence",
         "colour_adherence_body_sentence", "chromatic_share", "fd_en", "fd_zh", "diversity_feature")


def parse_interval(text: str) -> tuple[float, float] | None:
    """``none`` (guide at every noise level) or ``SIGMA_LO,SIGMA_HI``."""
    if text == "none":
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"interval must be 'none' or 'SIGMA_LO,SIGMA_HI', got {text!r}") from None
    return low, high


def parse_sigma_max(text: str) -> float | None:
    """``none`` (step noise at every step) or a noise level sigma."""
    if text == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"eta sigma max must be 'none' or a noise level, got {text!r}") from None


def parse_condition_noise(text: str) -> tuple[float, float, float] | None:
    """``none`` (the prompt at every level) or ``SCALE,SIGMA_LO,SIGMA_HI``."""
    if text == "none":
        return None
    try:
        scale, low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"condition noise must be 'none' or 'SCALE,SIGMA_LO,SIGMA_HI', "
                                         f"got {text!r}") from None
    return scale, low, high


def noise_settings(etas: Sequence[float], sigma_maxes: Sequence[float | None]) -> list[tuple[float, float | None]]:
    """Every (eta, eta_sigma_max) pair, with eta 0 once (it has no step noise to limit)."""
    return list(dict.fromkeys((eta, sigma_max if eta > 0 else None)
                              for eta, sigma_max in itertools.product(etas, sigma_maxes)))


def drawn_alike(settings: GenerationSettings, schedule: NoiseSchedule) -> tuple:
    """What decides a setting's samples: its fields, with the guidance interval, the scale above it and the
    step-noise limit read as the scales each sampling step takes and the steps that get noise. Settings with equal
    keys draw the same samples from the same seeds."""
    timesteps = settings.timesteps(schedule)
    guide_scale = None if settings.guide_unet is None else settings.autoguidance_scale
    guidance = tuple(step_guidance(schedule, timesteps, settings.guidance_scale, settings.guidance_interval,
                                   settings.guidance_scale_above, guide_scale))
    noisy = tuple(step_etas(schedule, timesteps.tolist(), settings.eta, settings.eta_sigma_max))
    fields = dataclasses.asdict(settings)
    return tuple((name, fields[name]) for name in sorted(fields) if name not in (
        "guidance_interval", "guidance_scale_above", "eta", "eta_sigma_max")) + (
        ("step_guidance", guidance), ("step_etas", noisy))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sampling_sweep", description=__doc__.split("\n\n")[0])
    add_debug_flag(parser)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace the sweep already at --out (default: refuse)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[2.0, 3.0, 4.0, 5.0])  # around the default
    parser.add_argument("--rescale", type=float, nargs="+", default=[0.0, 0.7])
    parser.add_argument("--steps", type=int, nargs="+", default=[25])
    parser.add_argument("--interval", type=parse_interval, nargs="+",
                        default=[None, GenerationSettings.guidance_interval],
                        help="guidance intervals: 'none' (every level) or SIGMA_LO,SIGMA_HI (e.g. 0.28,7.5)")
    parser.add_argument("--guidance-above", type=float, nargs="+", default=[GenerationSettings.guidance_scale_above],
                        help="guidance scales above the interval (1: the prompt's prediction alone); drawn with the "
                             "intervals that have a finite top")
    parser.add_argument("--first-order-at-guidance-edges", choices=("off", "on"), nargs="+", default=["off"],
                        help="dpmpp_2m: extrapolate across the guidance interval's edges (off) or step first order "
                             "there (on)")
    parser.add_argument("--sampler", default=GenerationSettings.sampler)
    parser.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS, nargs="+",
                        default=[GenerationSettings.timestep_spacing])
    parser.add_argument("--eta", type=float, nargs="+",
                        help="step noise: 0 deterministic, 1 as much as ancestral ddpm (ddim and dpmpp_2m; default "
                             f"{DEFAULT_STEP_NOISE[0]:g}, none for ddpm)")
    parser.add_argument("--eta-sigma-max", type=parse_sigma_max, nargs="+", default=[DEFAULT_STEP_NOISE[1]],
                        help="step noise only below these noise levels: 'none' (every step) or SIGMA; applied to "
                             "the settings with eta > 0")
    parser.add_argument("--condition-noise", type=parse_condition_noise, nargs="+",
                        default=[DEFAULT_CONDITION_NOISE],
                        help="prompt annealing (CADS): 'none' or SCALE,SIGMA_LO,SIGMA_HI (default: generation's, "
                             "{:g},{:g},{:g})".format(*DEFAULT_CONDITION_NOISE))
    parser.add_argument("--guide-unet", type=lambda text: None if text == "none" else text, nargs="+",
                        default=[None], metavar="FOLDER",
                        help="autoguidance: 'none' or a weaker UNet on the run's VAE and CLIP at its resolution, "
                             "guided away from beside classifier-free guidance (--guidance 1: alone)")
    parser.add_argument("--autoguidance", type=float, nargs="+", default=[GenerationSettings.autoguidance_scale],
                        metavar="SCALE", help="autoguidance scales, for each --guide-unet folder")
    parser.add_argument("--seed-sets", type=int, default=1,
                        help="draws of every setting with disjoint seeds; from 2 up each figure gets its spread")
    parser.add_argument("--showcase", type=Path, metavar="DIR",
                        help="also draw each setting's showcase picture (final_samples.png's prompts and seeds) here")
    args = parser.parse_args(argv)
    check_counts(args, "--seed-sets")
    check_output_file(args.out, "--out", args.overwrite)  # a sweep can take an hour: never over an earlier one
    if args.showcase:
        check_folder_path(args.showcase, "--showcase")
    if args.showcase and (args.showcase / "showcase.md").exists() and not args.overwrite:
        raise UserError(f"{args.showcase} holds an earlier sweep's showcase; pass another --showcase, or --overwrite "
                        "to replace it")
    etas = args.eta or [default_step_noise(args.sampler)[0]]  # ddpm: none of its own, as in generation
    guides = [(guide, auto) for guide in args.guide_unet  # an autoguidance scale without a guide means nothing
              for auto in (args.autoguidance if guide is not None else [GenerationSettings.autoguidance_scale])]
    settings_grid = [GenerationSettings(guidance_scale=scale, guidance_rescale=rescale, guidance_interval=interval,
                                        guidance_scale_above=above, first_order_at_guidance_edges=edges == "on",
                                        steps=steps, timestep_spacing=spacing,
                                        sampler=args.sampler, eta=eta, eta_sigma_max=sigma_max,
                                        condition_noise=condition_noise, guide_unet=guide, autoguidance_scale=auto)
                     for scale, rescale, interval, above, edges, steps, spacing, (eta, sigma_max), condition_noise,
                     (guide, auto)
                     in itertools.product(args.guidance, args.rescale, args.interval, args.guidance_above,
                                          args.first_order_at_guidance_edges, args.steps, args.timestep_spacing,
                                          noise_settings(etas, args.eta_sigma_max), args.condition_noise,
                                          guides)
                     if (above == 1 or has_levels_above(interval))
                     # the first-order edge step changes nothing where no multistep sampler crosses a guidance edge
                     and (edges == "off" or (args.sampler == "dpmpp_2m" and interval is not None
                                            and (is_guided(scale, None if guide is None else auto) or above != 1)))
                     ]  # checked before loading
    if not settings_grid:
        raise UserError("no setting left to draw: a scale above the interval needs an interval with a finite top "
                        "(not 'none'), and the first-order edge step needs dpmpp_2m, an interval and some guidance")
    guide_folders = {settings.guide_unet for settings in settings_grid} - {None}
    if guide_folders:  # each fits the run's UNet: checked before the real images' reference, not at its setting
        unet_info = stack_infos(args.run)["unet"]
        for folder in sorted(guide_folders):
            check_guide(folder, unet_info)
    stack = load_stack(args.run)
    judge_dir = judge_path(args.run)
    judge = CLIPModel.load(judge_dir, device=stack.device).eval()
    judge_name = describe_judge(judge_dir)  # its fingerprint: what pipelines.paired pairs copies under
    data = load_captions(args.data, resolution=stack.image_size)
    train, val = data.subset("train"), data.subset("val")
    reference = real_reference(judge, train, val, stack.image_size)  # the same for every setting
    records, first_drawn = [], []
    one_per_schedule = {(settings.steps, settings.timestep_spacing): settings for settings in settings_grid}
    for (steps, spacing), settings in sorted(one_per_schedule.items()):
        sigmas = stack.schedule.sigmas[settings.timesteps(stack.schedule)].tolist()
        # four digits: a bound of 10 falls below the step printed 10.02 at 25 steps, which .3g would print 10
        print(f"{steps} steps ({spacing}) start at sigma " + ", ".join(f"{sigma:.4g}" for sigma in sigmas))
    keys = [drawn_alike(settings, stack.schedule) for settings in settings_grid]
    print("| guidance | rescale | interval | above it | first order at edges | steps | spacing | eta | eta sigma max | "
          "condition noise | "
          "guide UNet | autoguidance | " + " | ".join(SHOWN) + " |", flush=True)
    showcase = []
    for index, settings in enumerate(settings_grid):
        settings = dataclasses.replace(settings, size=stack.image_size)
        record = {key: getattr(settings, key) for key in ("guidance_scale", "guidance_rescale", "guidance_interval",
                                                          "guidance_scale_above", "first_order_at_guidance_edges",
                                                          "steps", "timestep_spacing", "eta", "eta_sigma_max",
                                                          "condition_noise", "guide_unet")}
        record["autoguidance_scale"] = None if settings.guide_unet is None else settings.autoguidance_scale
        earlier = keys.index(keys[index])
        if earlier < index:  # its bounds select the steps an earlier setting's did: the same samples, not redrawn
            records.append({**record, **{key: value for key, value in records[earlier].items()
                                         if key not in record and key != "samples"}, "same_samples_as": earlier})
            if args.showcase:
                showcase += [f"## setting {index:02d}: {settings.describe()}", "",
                             f"The same samples as setting {earlier:02d}.", ""]
        else:
            drawn: list[dict] = []  # every sample's record, over the seed sets: paired with the first setting's
            summary = over_seed_sets([generation_metrics(stack, judge, train, val, settings, reference=reference,
                                                         seed_offset=k * SEED_SET_STRIDE, records=drawn)
                                      for k in range(args.seed_sets)])
            if index == 0:
                first_drawn = drawn
            pictures = {}
            if args.showcase:
                picture = draw_showcase(stack, settings, args.showcase / f"setting_{index:02d}.png")
                pictures = {"showcase": str(picture)}
                showcase += [f"## setting {index:02d}: {settings.describe()}", "",
                             f"![setting {index:02d}]({picture.name})", ""]
            paired = {"paired_with_first": paired_differences(first_drawn, drawn)} if index else {}
            records.append({**record, "metrics": summary["mean"],
                            **({"metrics_sd": summary["sd"]} if "sd" in summary else {}), **paired, **pictures,
                            "samples": drawn})
        metrics, spread = records[-1]["metrics"], records[-1].get("metrics_sd", {})
        print("| " + " | ".join(str(value) for value in record.values()) + " | "
              + " | ".join(f"{metrics[k]:.3f}" + (f" ± {spread[k]:.3f}" if spread else "") for k in SHOWN) + " |"
              + (f" same samples as setting {earlier:02d}" if earlier < index else ""), flush=True)
        # after every setting, so a sweep cut short (a machine taken back) keeps what it measured
        write_json(args.out, {"run": str(args.run), "judge": judge_name, "sampler": args.sampler,
                              "seed_sets": args.seed_sets,
                              "gpu": torch.cuda.get_device_name(stack.device) if stack.device.type == "cuda" else "cpu",
                              "command": command_line("python -m benchmarks.sampling_sweep", argv),
                              "settings": len(settings_grid), "records": records})
        if args.showcase:
            (args.showcase / "showcase.md").write_text("\n".join(
                ["# The sweep's settings by eye", "", f"Run `{args.run}`, as in its final_samples.png: "
                 f"{showcase_layout()}.", ""] + showcase), encoding="utf-8")


if __name__ == "__main__":
    run_cli(main)

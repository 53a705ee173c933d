"""When a sample's colour is decided: the evaluation's colour prompts (``pipelines.metrics.colour_prompts``) drawn
at the generation default (or the settings given), each sampling step's x0 prediction decoded by the VAE and read
by the evaluation's colour rule, so that the noise level at which each sample's body colour settles can be set
beside the levels the guidance acts on.

    python -m benchmarks.colour_trajectory --run runs/A --out colour_trajectory.json \\
        --plot colour_trajectory.png --strip colour_strip.png

Per step (``steps``): the step's noise level sigma (None for the pure-noise start), the guidance scale it takes,
the share of samples whose x0 prediction already shows the named colour among its two dominant hue families
(``hit_share``, the evaluation's verdict; the last step's is the evaluation's own for these prompts and seeds),
the named family's mean share of the chromatic foreground (``named_pixel_share``), and the share whose dominant
hue family is already the final one and stays so (``settled_share``). Per sample (``samples``): the step from
which its dominant family stays the final one (``settled_step``) and that step's sigma (None: from the start).
``summary`` counts how many settle at a step above the guidance interval's top, where the default runs on the
prompt alone. ``--strip`` saves the first seed of each colour's English prompt, x0 prediction by step, 64 px a
tile: the colour coming in.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from diffusion.guidance import step_guidance
from engine.cli import add_result_flags, check_counts, check_output_files, command_line
from engine.errors import add_debug_flag, run_cli
from engine.images import save_grid
from engine.precision import inference_autocast
from engine.stage import write_json
from pipelines.evaluate import SEED_SET_STRIDE
from pipelines.metrics import (COLOUR_FAMILIES, FAMILY_NAMES, PROMPT_COLOURS, colour_hits_from_counts,
                               colour_prompts, hue_family_counts, share_by_colour)
from pipelines.stages import StageStack, add_stage_arguments, generation_size, load_stack, sampling_size, stack_infos
from pipelines.text_to_image import (GenerationSettings, add_sampling_arguments, generate_with_latents,
                                     sampling_settings)

STRIP_TILE = 64  # px a tile of --strip: committed pictures stay small
STRIP_COLUMNS = 9  # steps shown per sample in --strip, evenly spaced, the last always among them


def dominant_families(counts: Tensor) -> Tensor:
    """``[..., families]`` chromatic pixel counts -> ``[...]`` the most common family's index, -1 where an image
    has no chromatic pixel (no colour to settle)."""
    return torch.where(counts.sum(-1) > 0, counts.argmax(-1), torch.full(counts.shape[:-1], -1))


def settled_steps(families: Tensor) -> Tensor:
    """``[steps, B]`` a value per step and sample -> ``[B]`` the first step from which the value equals its last
    at every later step (0: from the start; ``steps - 1``: only at the last)."""
    index = torch.arange(len(families))[:, None].expand_as(families)
    last_different = torch.where(families != families[-1], index, torch.full_like(index, -1)).amax(dim=0)
    return last_different + 1


def step_sigmas(stack: StageStack, timesteps: Tensor) -> list[float | None]:
    """Each sampling step's starting noise level (``NoiseSchedule.sigmas``); None for a zero-terminal-SNR
    schedule's pure-noise start, whose sigma is infinite (JSON has no infinity)."""
    return [sigma if math.isfinite(sigma) else None for sigma in stack.schedule.sigmas[timesteps.cpu().long()].tolist()]


def trace(stack: StageStack, prompts: Sequence[str], seeds: Sequence[int], settings: GenerationSettings,
          strip_rows: Sequence[int] = ()) -> dict[str, Any]:
    """Draw ``prompts`` at ``settings``, reading every step's decoded x0 prediction: ``counts`` [steps, B,
    families] and ``foreground`` [steps, B] (``pipelines.metrics.hue_family_counts``), and ``strip``
    [len(strip_rows), steps, 3, STRIP_TILE, STRIP_TILE] thumbnails. The last step's x0 prediction is the sample
    itself, so its counts are the generated images' own."""
    decode_context = inference_autocast(stack.device)
    counts: list[list[Tensor]] = []  # per batch, per step
    foreground: list[list[Tensor]] = []
    strip: dict[int, list[Tensor]] = {row: [] for row in strip_rows}
    for start in range(0, len(prompts), settings.batch_size):
        rows = range(start, min(start + settings.batch_size, len(prompts)))
        batch_counts: list[Tensor] = []
        batch_foreground: list[Tensor] = []

        def read_step(step: int, x: Tensor, x0_hat: Tensor) -> None:
            with decode_context:
                images = stack.vae.decode(stack.latent_normalisation.denormalise(x0_hat)).float().clamp(-1, 1)
            step_counts, step_foreground = hue_family_counts(images)
            batch_counts.append(step_counts.cpu())
            batch_foreground.append(step_foreground.cpu())
            for i, row in enumerate(rows):
                if row in strip:
                    tile = torch.nn.functional.interpolate(images[i:i + 1], size=(STRIP_TILE, STRIP_TILE),
                                                           mode="area")
                    strip[row].append(tile[0].cpu())

        generate_with_latents(stack, [prompts[r] for r in rows], [seeds[r] for r in rows], settings,
                              callback=read_step)
        counts.append(batch_counts)
        foreground.append(batch_foreground)
    return {"counts": torch.cat([torch.stack(c) for c in counts], dim=1),
            "foreground": torch.cat([torch.stack(f) for f in foreground], dim=1),
            "strip": torch.stack([torch.stack(strip[row]) for row in strip_rows]) if strip_rows else None}


def trajectory(stack: StageStack, settings: GenerationSettings, seeds: int = 8, seed_offset: int = 0,
               strip: Path | None = None) -> dict[str, Any]:
    """The colour trajectory of the evaluation's colour prompts (``seeds`` seeds each, shifted by
    ``seed_offset``) at ``settings``: the ``steps``, ``samples`` and ``summary`` of the module's doc."""
    prompts, seed_list, named = colour_prompts(seeds)
    seed_list = [seed + seed_offset for seed in seed_list]
    english = {name: words for name, words, _, _ in COLOUR_FAMILIES}
    strip_rows = [prompts.index(f"a {english[colour]} pokemon") for colour in PROMPT_COLOURS] if strip else []
    traced = trace(stack, prompts, seed_list, settings, strip_rows)
    counts, foreground = traced["counts"], traced["foreground"]
    timesteps = settings.timesteps(stack.schedule)
    sigmas = step_sigmas(stack, timesteps)
    guidance = [scale for scale, _ in step_guidance(stack.schedule, timesteps, settings.guidance_scale,
                                                    settings.guidance_interval, settings.guidance_scale_above)]
    hits = torch.stack([colour_hits_from_counts(c, f, list(named)) for c, f in zip(counts, foreground)])
    wanted = torch.tensor([FAMILY_NAMES.index(n) for n in named])
    chromatic = counts.sum(-1).clamp_min(1)
    named_share = counts.gather(2, wanted[None, :, None].expand(len(counts), -1, 1)).squeeze(2) / chromatic
    families = dominant_families(counts)
    settled = settled_steps(families)
    steps_held = torch.arange(len(counts))[:, None] >= settled[None, :]
    hit_from = settled_steps(hits.long())

    steps = [{"step": i, "timestep": int(t), "sigma": sigmas[i], "guidance": guidance[i],
              "hit_share": float(hits[i].float().mean()), "named_pixel_share": float(named_share[i].mean()),
              "settled_share": float(steps_held[i].float().mean()),
              "hit_share_by_colour": share_by_colour(hits[i], named)}
             for i, t in enumerate(timesteps.tolist())]
    final_hit = hits[-1]
    samples = [{"prompt": prompts[j], "seed": seed_list[j], "named": named[j],
                "final_family": FAMILY_NAMES[f] if (f := int(families[-1, j])) >= 0 else None,
                "final_hit": bool(final_hit[j]), "settled_step": int(settled[j]),
                "settled_sigma": sigmas[int(settled[j])],
                "hit_step": int(hit_from[j]) if final_hit[j] else None}
               for j in range(len(prompts))]
    top = settings.guidance_interval[1] if settings.guidance_interval else None
    above_interval = [] if top is None else [i for i, s in enumerate(sigmas) if s is None or s > top]
    # the steps above the window are the first ones: a sample settled there settled by the last of them
    settled_above = settled <= max(above_interval, default=-1)
    summary = {"samples": len(prompts), "final_hit_share": float(final_hit.float().mean()),
               "median_settled_step": statistics.median(settled.tolist()),
               "steps_above_guidance_interval": len(above_interval),
               "settled_above_guidance_interval": float(settled_above.float().mean()),
               "settled_above_guidance_interval_hits": _share(settled_above, final_hit),
               "settled_above_guidance_interval_misses": _share(settled_above, ~final_hit),
               "final_hit_share_by_colour": steps[-1]["hit_share_by_colour"]}
    if strip:
        save_strip(traced["strip"], strip)
    return {"steps": steps, "samples": samples, "summary": summary}


def _share(flags: Tensor, within: Tensor) -> float | None:
    """Share of ``flags`` among the samples ``within`` selects (None when it selects none)."""
    return float(flags[within].float().mean()) if bool(within.any()) else None


def save_strip(tiles: Tensor, path: Path) -> Path:
    """``[rows, steps, 3, h, w]`` -> one PNG, a row per sample, ``STRIP_COLUMNS`` evenly spaced steps."""
    steps = tiles.shape[1]
    columns = sorted({round(k * (steps - 1) / (STRIP_COLUMNS - 1)) for k in range(STRIP_COLUMNS)})
    return save_grid(tiles[:, columns].flatten(0, 1), path, nrow=len(columns))


def plot(result: dict[str, Any], path: Path) -> Path:
    """Hit share, named-pixel share and settled share by step, the guided steps shaded, sigma on the top axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["steps"]
    x = [s["step"] for s in steps]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for i, s in enumerate(steps):
        if s["guidance"] != 1.0:
            ax.axvspan(i - 0.5, i + 0.5, color="0.9", lw=0)
    ax.plot(x, [s["hit_share"] for s in steps], "o-", ms=3, label="named colour among the two dominant")
    ax.plot(x, [s["named_pixel_share"] for s in steps], "s-", ms=3, label="named family's share of the colour")
    ax.plot(x, [s["settled_share"] for s in steps], "^-", ms=3, label="dominant family already final")
    ax.set_xlabel("sampling step (grey: guided)")
    ax.set_ylim(0, 1)
    ax.set_xlim(-0.5, len(steps) - 0.5)
    top = ax.secondary_xaxis("top")
    ticks = x[::3]
    top.set_ticks(ticks, labels=["inf" if steps[i]["sigma"] is None else f"{steps[i]['sigma']:.2g}" for i in ticks])
    top.set_xlabel("sigma at the step's start")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.colour_trajectory",
                                     description=__doc__.split("\n\n")[0])
    add_stage_arguments(parser)
    add_result_flags(parser, required=True, help="the result (JSON)")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per colour prompt (the evaluation's: 8)")
    parser.add_argument("--seed-offset", type=int, default=0,
                        help=f"added to every seed (the sampling sweep's seed set k: k * {SEED_SET_STRIDE})")
    parser.add_argument("--plot", type=Path, help="also draw the shares by step here (PNG)")
    parser.add_argument("--strip", type=Path, help="also save each colour's first English sample by step here (PNG)")
    parser.add_argument("--device")
    add_sampling_arguments(parser)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    check_output_files(args, "--out", "--plot", "--strip")
    check_counts(args, "--seeds")
    infos = stack_infos(args.run, vae=args.vae, clip=args.clip, unet=args.unet)  # config files before weights
    settings = sampling_settings(args, size=sampling_size(None, infos["vae"].model, infos["unet"].model,
                                                          generation_size(infos)))
    stack = load_stack(args.run, vae=args.vae, clip=args.clip, unet=args.unet, device=args.device)
    result = {"run": None if args.run is None else str(args.run), "settings": settings.describe(),
              "seeds": args.seeds, "seed_offset": args.seed_offset,
              **trajectory(stack, settings, args.seeds, args.seed_offset, args.strip),
              "device": torch.cuda.get_device_name() if stack.device.type == "cuda" else "cpu",
              "command": command_line("python -m benchmarks.colour_trajectory", argv)}
    summary = result["summary"]
    print(f"{summary['samples']} samples: final colour hits {summary['final_hit_share']:.3f}; dominant hue settled "
          f"at median step {summary['median_settled_step']}, {summary['settled_above_guidance_interval']:.3f} of "
          f"them in the {summary['steps_above_guidance_interval']} steps above the guidance interval")
    write_json(args.out, result)
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    run_cli(main)

"""What a user of ``pipelines.generate`` gets: images/s of the whole text→image call on a trained run.

    python -m benchmarks.generate_speed --run runs/pokemon --out docs/results/bench/generate_speed.json

Times ``pipelines.text_to_image.generate`` end to end (text encoding, the sampling loop with guidance, VAE
decode, clamping) for one batch of prompts, with the UNet eager and replayed from a CUDA graph, for 50-step
DDIM and the default fast sampler, both guided in the default noise-level interval at the default step noise,
the fast sampler guided at every level too (outside the interval a step runs the conditional batch alone, so
the two differ by exactly that saved work), and the fast sampler without step noise (what drawing it costs).
One untimed call per case first captures the graph (its time is reported as ``first_call_s``). The images of
the two UNet paths are compared too: replay must not change them.

Then the default case three ways, all replayed from the graph: the stack as loaded (norms in the precision each
model trained them in), the UNet compiled (``--compile``; the first call holds the compile), and every norm in
autocast's fp32; and where its seconds go (text encoding, sampling loop, VAE decode). ``--sections`` picks among
these three parts (``cases``, ``variants``, ``seconds``).

cuDNN's convolution algorithms come from its heuristics, as in ``pipelines.generate``, unless ``--cudnn-benchmark``
times the candidates for each shape first (``torch.backends.cudnn.benchmark``). A process keeps the first choice it
makes for a shape whichever way it was made, so the two are compared in two processes:

    python -m benchmarks.generate_speed --run runs/pokemon --sections cases,seconds --out heuristics.json
    python -m benchmarks.generate_speed --run runs/pokemon --sections cases,seconds --cudnn-benchmark --out timed.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from benchmarks.measure import cudnn_benchmark
from engine.cli import add_result_flags, check_counts, check_output_files, comma_choices, command_line
from engine.errors import add_debug_flag, run_cli
from engine.precision import inference_autocast, set_low_precision_norms
from engine.stage import write_json
from pipelines.prompts import GRID_PROMPTS
from pipelines.stages import StageStack, load_stack, norms_as_trained
from pipelines.text_to_image import GenerationSettings, generate


def _timed(call, device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


Interval = tuple[float, float] | None
Case = tuple[str, int, Interval, float | None]  # sampler, steps, guidance interval, eta (None: the default noise)


def generate_speed(stack: StageStack, batch: int, repeats: int, cases: Sequence[Case],
                   guidance_scale: float) -> list[dict[str, Any]]:
    """One row per (sampler, steps, guidance interval, eta) case and UNet path (eager, CUDA graph); eta None is
    the default step noise."""
    prompts = [GRID_PROMPTS[i % len(GRID_PROMPTS)] for i in range(batch)]
    seeds = list(range(batch))
    rows = []
    for sampler, steps, interval, eta in cases:
        images = {}
        for cuda_graph in (False, True):
            settings = GenerationSettings(guidance_scale=guidance_scale, steps=steps, sampler=sampler, eta=eta,
                                          guidance_interval=interval, size=stack.image_size, batch_size=batch,
                                          cuda_graph=cuda_graph)
            images[cuda_graph], first_s = _timed(lambda: generate(stack, prompts, seeds, settings), stack.device)
            seconds = [_timed(lambda: generate(stack, prompts, seeds, settings), stack.device)[1]
                       for _ in range(repeats)]
            rows.append({"sampler": f"{sampler}-{steps}", "guidance_interval": interval, "eta": settings.eta,
                         "eta_sigma_max": settings.eta_sigma_max, "cuda_graph": cuda_graph,
                         "images_per_s": batch / (sum(seconds) / len(seconds)), "first_call_s": first_s,
                         "seconds_per_call": seconds})
        rows[-1]["max_abs_diff_vs_eager"] = float((images[True] - images[False]).abs().max())
        rows[-1]["speedup_vs_eager"] = rows[-1]["images_per_s"] / rows[-2]["images_per_s"]
    return rows


def default_case_variants(stack: StageStack, batch: int, repeats: int, guidance_scale: float
                          ) -> list[dict[str, Any]]:
    """The default setting (CUDA graph on CUDA) with the stack as loaded, with the UNet compiled, and with every
    norm in fp32; each row's images are compared with the first's. The stack's norms end as loaded."""
    prompts = [GRID_PROMPTS[i % len(GRID_PROMPTS)] for i in range(batch)]
    seeds = list(range(batch))
    rows, reference = [], None
    for variant in ("as loaded", "compiled", "fp32 norms"):
        if variant == "fp32 norms":
            set_low_precision_norms(stack.unet, False)
            set_low_precision_norms(stack.vae, False)
        settings = GenerationSettings(guidance_scale=guidance_scale, size=stack.image_size, batch_size=batch,
                                      compile_unet=variant == "compiled")
        images, first_s = _timed(lambda: generate(stack, prompts, seeds, settings), stack.device)
        seconds = [_timed(lambda: generate(stack, prompts, seeds, settings), stack.device)[1] for _ in range(repeats)]
        reference = images if reference is None else reference
        rows.append({"variant": variant, "images_per_s": batch / (sum(seconds) / len(seconds)),
                     "first_call_s": first_s, "seconds_per_call": seconds,
                     "max_abs_diff_vs_as_loaded": float((images - reference).abs().max()),
                     # one flipped pixel makes the max 2 on trained weights; the RMS says how much of the image moved
                     "rms_diff_vs_as_loaded": float((images - reference).pow(2).mean().sqrt())})
    norms_as_trained(stack.unet, stack.infos["unet"])
    norms_as_trained(stack.vae, stack.infos["vae"])
    return rows


def where_the_seconds_go(stack: StageStack, batch: int, repeats: int, guidance_scale: float) -> dict[str, float]:
    """Seconds per default ``generate`` call of ``batch`` images: its text encoding and VAE decode timed alone,
    the sampling loop as the rest."""
    prompts = [GRID_PROMPTS[i % len(GRID_PROMPTS)] for i in range(batch)]
    settings = GenerationSettings(guidance_scale=guidance_scale, size=stack.image_size, batch_size=batch)
    latent = stack.image_size // stack.vae.downsample_factor
    latents = torch.randn(batch, stack.vae.latent_channels, latent, latent, device=stack.device)

    def mean_seconds(call) -> float:
        _timed(call, stack.device)
        return sum(_timed(call, stack.device)[1] for _ in range(repeats)) / repeats

    with torch.no_grad(), inference_autocast(stack.device):
        text = mean_seconds(lambda: stack.clip.text_states(prompts))
        decode = mean_seconds(lambda: stack.vae.decode(latents))
    total = mean_seconds(lambda: generate(stack, prompts, list(range(batch)), settings))
    return {"total_s": total, "text_encoding_s": text, "vae_decode_s": decode, "sampling_s": total - text - decode}


SECTIONS = ("cases", "variants", "seconds")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generate_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a trained run folder (vae/, clip/, unet/)")
    parser.add_argument("--batch", type=int, default=16, help="prompts per generate() call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case, after one untimed")
    parser.add_argument("--guidance", type=float, default=GenerationSettings.guidance_scale)
    parser.add_argument("--fast-steps", type=int, default=GenerationSettings.steps,
                        help="steps of the default fast sampler (dpmpp_2m)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma list of the parts to time: {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN time its convolution algorithms per shape (default: its heuristics, as "
                             "pipelines.generate runs)")
    parser.add_argument("--device")
    add_result_flags(parser)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    sections = comma_choices(args.sections, "--sections", SECTIONS)
    check_output_files(args, "--out")
    check_counts(args, "--batch", "--repeats", "--fast-steps")  # before the 50-step case is timed

    stack = load_stack(args.run, device=args.device)
    interval = GenerationSettings.guidance_interval
    cases = [("ddim", 50, interval, None), ("dpmpp_2m", args.fast_steps, interval, None),
             ("dpmpp_2m", args.fast_steps, None, None), ("dpmpp_2m", args.fast_steps, interval, 0.0)]
    with cudnn_benchmark(args.cudnn_benchmark):
        rows = generate_speed(stack, args.batch, args.repeats, cases, args.guidance) if "cases" in sections else []
        variants = (default_case_variants(stack, args.batch, args.repeats, args.guidance)
                    if "variants" in sections else [])
        split = (where_the_seconds_go(stack, args.batch, args.repeats, args.guidance)
                 if "seconds" in sections else {})
    result = {"cases": rows, "default_case_variants": variants, "default_case_seconds": split, "batch": args.batch,
              "cudnn_benchmark": args.cudnn_benchmark, "size": stack.image_size, "guidance_scale": args.guidance,
              "device": torch.cuda.get_device_name(stack.device) if stack.device.type == "cuda" else "cpu",
              "torch": torch.__version__, "run": str(args.run),
              "command": command_line("python -m benchmarks.generate_speed", argv)}
    for row in rows:
        extra = f", {row['speedup_vs_eager']:.2f}x, max |diff| {row['max_abs_diff_vs_eager']:.3g}" \
            if "speedup_vs_eager" in row else ""
        where = "every level" if row["guidance_interval"] is None else f"sigma in {row['guidance_interval']}"
        noise = f"eta {row['eta']:g}" + ("" if row["eta_sigma_max"] is None else f" below {row['eta_sigma_max']:g}")
        print(f"{row['sampler']:>12}  {where:>24}  {noise:>16}  cuda_graph={row['cuda_graph']!s:5}  "
              f"{row['images_per_s']:6.2f} img/s{extra}")
    for row in variants:
        print(f"default case, {row['variant']:>10}: {row['images_per_s']:6.2f} img/s (first call "
              f"{row['first_call_s']:.1f} s), max |diff| vs as loaded {row['max_abs_diff_vs_as_loaded']:.3g}")
    if split:
        print("default case, seconds per call: " + ", ".join(f"{k} {v:.3f}" for k, v in split.items()))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    run_cli(main)

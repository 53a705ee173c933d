"""Export a trained run to diffusers, load it back offline and measure how far it is from ours.

    python -m benchmarks.export_check --run runs/NAME --out docs/results/export/summary.json

Writes ``--out`` with ``vae_max_abs_diff`` (the larger of encode and decode), ``unet_max_abs_diff`` (fp32,
TF32 off, on ``--device``), ``pipeline_max_abs_diff_pixels`` (``StableDiffusionPipeline`` from the export with
our text states against ``pipelines.generate``, same seed, DDIM eta 0 with the same trailing timesteps, both
in [0, 1] pixels), ``diffusers_version``, ``gpu`` and ``command``.

The pipeline comparison runs on ``--pipeline-device`` (default cpu): ``pipelines.generate`` samples under
bf16 autocast on CUDA, and a bf16 trajectory would measure rounding, not the mapping.
Needs diffusers and transformers (``pip install -e ".[diffusers]"``); ``HF_HUB_OFFLINE=1`` is set, so
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the check must load the export with no network

import torch  # noqa: E402

try:
    import diffusers  # noqa: E402
    from diffusers import AutoencoderKL as DiffusersVAE  # noqa: E402
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
except ImportError:
    raise SystemExit("the export check needs diffusers and transformers: pip install -e '.[diffusers]'") from None

from diffusion.noise import PerSampleNoise  # noqa: E402
from diffusion.schedule import ScheduleConfig  # noqa: E402
from engine.cli import add_result_flags, check_output_files, command_line  # noqa: E402
from engine.config import config_from_dict  # noqa: E402
from engine.distributed import resolve_device  # noqa: E402
from engine.errors import UserError, add_debug_flag, run_cli  # noqa: E402
from engine.stage import write_json  # noqa: E402
from pipelines.export import export_diffusers  # noqa: E402
from pipelines.prompt_embeds import prompt_embeds  # noqa: E402
from pipelines.stages import LineageWarning, StageStack, load_stack, stack_infos  # noqa: E402
from pipelines.text_to_image import GenerationSettings, generate_with_latents  # noqa: E402
from unet.model import UNet  # noqa: E402
from vae.model import AutoencoderKL  # noqa: E402

PROMPTS = ("a red and white pokemon with big eyes", "一只蓝色的鸟宝可梦")


@torch.no_grad()
def vae_differences(ours: AutoencoderKL, theirs: DiffusersVAE, images: torch.Tensor) -> dict[str, float]:
    """Largest |ours - theirs| of the posterior mean and of the decode of those latents."""
    mean = ours.encode(images).mean
    theirs_mean = theirs.encode(images).latent_dist.mean
    return {"encode": (mean - theirs_mean).abs().max().item(),
            "decode": (ours.decode(mean) - theirs.decode(mean).sample).abs().max().item()}


@torch.no_grad()
def unet_difference(ours: UNet, theirs: UNet2DConditionModel, latents: torch.Tensor, timesteps: torch.Tensor,
                    context: torch.Tensor) -> float:
    """Largest |ours - theirs| of the raw prediction (zero augmentation label: the exported UNet's setting)."""
    return (ours(latents, timesteps, context)
            - theirs(latents, timesteps, encoder_hidden_states=context).sample).abs().max().item()


@torch.no_grad()
def pipeline_difference(stack: StageStack, export_dir: str | Path, prompts: Sequence[str], seed: int,
                        settings: GenerationSettings) -> float:
    """Largest pixel difference in [0, 1] between ``pipelines.generate`` (DDIM eta 0) and the exported
    ``StableDiffusionPipeline`` given our text states and our initial noise."""
    if settings.sampler != "ddim" or settings.eta != 0:
        raise ValueError("the pipeline comparison runs DDIM with eta 0: the exported scheduler's update")
    if settings.guidance_interval is not None:
        raise ValueError("diffusers' pipeline guides at every noise level: compare with guidance_interval=None")
    seeds = [seed + i for i in range(len(prompts))]
    ours, _ = generate_with_latents(stack, prompts, seeds, settings)
    # the text encoder and tokenizer stay ours: diffusers wants them passed as None explicitly
    pipe = StableDiffusionPipeline.from_pretrained(str(export_dir), text_encoder=None, tokenizer=None,
                                                   local_files_only=True).to(stack.device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(settings.steps)
    expected = stack.schedule.sampling_timesteps(settings.steps)
    if not torch.equal(pipe.scheduler.timesteps.cpu(), expected):
        raise ValueError(f"diffusers' trailing timesteps {pipe.scheduler.timesteps.tolist()} differ from ours "
                         f"{expected.tolist()} (diffusers rounds, we floor): use steps that divide "
                         f"{stack.schedule.num_steps}")
    cond, uncond = prompt_embeds(stack.clip, prompts, settings.negative_prompt)
    latent_size = settings.size // stack.vae.downsample_factor
    shape = (stack.vae.latent_channels, latent_size, latent_size)
    noise = PerSampleNoise(seeds).initial(shape, stack.device)  # the starting noise pipelines.generate draws
    theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise,
                  num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                  guidance_rescale=settings.guidance_rescale, eta=0.0,
                  height=settings.size, width=settings.size, output_type="pt").images
    return ((ours.float() + 1) / 2 - theirs.float()).abs().max().item()


def check(run: str | Path, export_dir: str | Path, device: torch.device, pipeline_device: torch.device,
          settings: GenerationSettings, batch: int = 2) -> dict[str, Any]:
    """Export ``run`` to ``export_dir``, reload it with diffusers and return the differences; the end-to-end
    comparison samples at ``settings`` (:func:`diffusers_settings`) at the UNet's resolution."""
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
    torch.backends.cudnn.allow_tf32 = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LineageWarning)
        notes = export_diffusers(run, export_dir, overwrite=True)  # its own scratch export, made anew each call
        stack = load_stack(run, device=device)
    vae = DiffusersVAE.from_pretrained(str(Path(export_dir) / "vae"), local_files_only=True).to(device).eval()
    unet = UNet2DConditionModel.from_pretrained(str(Path(export_dir) / "unet"),
                                                local_files_only=True).to(device).eval()
    g = torch.Generator().manual_seed(0)
    size = stack.image_size
    images = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)
    vae_diff = vae_differences(stack.vae, vae, images)
    latent_size = size // stack.vae.downsample_factor
    latents = torch.randn(batch, stack.unet.config.in_channels, latent_size, latent_size, generator=g).to(device)
    context = torch.randn(batch, stack.clip.config.context_length, stack.unet.config.context_dim, generator=g)
    timesteps = torch.linspace(0, stack.schedule.num_steps - 1, batch).round().long()
    unet_diff = unet_difference(stack.unet, unet, latents, timesteps.to(device), context.to(device))
    del vae, unet, stack
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LineageWarning)
        pipeline_stack = load_stack(run, device=pipeline_device)
    settings = dataclasses.replace(settings, size=size)
    pixels = pipeline_difference(pipeline_stack, export_dir, PROMPTS, seed=0, settings=settings)
    return {"vae_max_abs_diff": max(vae_diff.values()), "vae_encode_max_abs_diff": vae_diff["encode"],
            "vae_decode_max_abs_diff": vae_diff["decode"], "unet_max_abs_diff": unet_diff,
            "pipeline_max_abs_diff_pixels": pixels, "notes": notes,
            "settings": {"image_size": size, "batch": batch, "steps": settings.steps,
                         "guidance_scale": settings.guidance_scale,
                         "sampler": "DDIM eta 0, trailing timesteps", "prompts": list(PROMPTS),
                         "models_device": str(device), "pipeline_device": str(pipeline_device)}}


def diffusers_settings(run: str | Path, steps: int, guidance_scale: float) -> GenerationSettings:
    """What ``StableDiffusionPipeline`` draws with DDIM at eta 0: guidance at every level, the prompt never annealed;
    checked, with the schedule's steps, before anything is exported."""
    settings = GenerationSettings(guidance_scale=guidance_scale, steps=steps, sampler="ddim", eta=0.0,
                                  cuda_graph=False, guidance_interval=None, condition_noise=None)
    num_steps = config_from_dict(ScheduleConfig, stack_infos(run)["unet"].training["schedule"]).num_steps
    if num_steps % steps:  # diffusers rounds the trailing timesteps, we floor: they agree only then
        nearest = min((d for d in range(1, num_steps + 1) if num_steps % d == 0), key=lambda d: (abs(d - steps), d))
        raise UserError(f"--steps {steps} must divide the schedule's {num_steps} steps for diffusers' trailing "
                        f"timesteps to be ours, e.g. --steps {nearest}")
    return settings


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export_check", description=__doc__.split("\n\n")[0])
    add_debug_flag(parser)
    parser.add_argument("--run", type=Path, required=True, help="a trained run folder (vae/, clip/, unet/)")
    add_result_flags(parser, required=True, help="summary JSON to write")
    parser.add_argument("--export-dir", type=Path, help="where to export (default: a temporary folder); an earlier "
                        "export there is replaced")
    parser.add_argument("--device", default=None, help="for the VAE and UNet comparison (default: cuda if available)")
    parser.add_argument("--pipeline-device", default="cpu", help="for the end-to-end comparison (default: cpu)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps; must divide the schedule's steps")
    parser.add_argument("--guidance", type=float, default=5.0)
    args = parser.parse_args(argv)
    check_output_files(args, "--out")
    settings = diffusers_settings(args.run, args.steps, args.guidance)
    device, pipeline_device = resolve_device(args.device), resolve_device(args.pipeline_device, "--pipeline-device")
    with tempfile.TemporaryDirectory() as tmp:
        result = check(args.run, args.export_dir or Path(tmp) / "export", device, pipeline_device, settings)
    summary = {**result, "diffusers_version": diffusers.__version__, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "command": command_line("python -m benchmarks.export_check", argv)}
    write_json(args.out, summary)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


if __name__ == "__main__":
    run_cli(main)

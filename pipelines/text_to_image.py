"""Text-to-image and image-to-image generation from a stage stack."""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from data.augment import resize, to_float
from data.captions import square_resize, to_rgb
from diffusion.guidance import (DEFAULT_AUTOGUIDANCE_SCALE, check_condition_noise, check_guidance_interval,
                                guided_sample_and_decode)
from diffusion.noise import PerSampleNoise
from diffusion.samplers import SAMPLERS, StepCallback, check_eta
from diffusion.schedule import TIMESTEP_SPACINGS, NoiseSchedule
from engine.errors import UserError
from engine.images import save_grid
from engine.precision import inference_autocast
from engine.stage import read_stage

from .prompts import SHOWCASE_PROMPTS, SHOWCASE_SEEDS
from .stages import StageStack, sampling_size


# (eta, eta_sigma_max) when no eta is given: deterministic down to sigma 3, where the layout is set, then as much
# fresh noise per step as ancestral sampling, which repairs loose fragments with fewer of the copies that noise at
# the high levels brings (docs/results/quality)
DEFAULT_STEP_NOISE = (1.0, 3.0)


def default_step_noise(sampler: str) -> tuple[float, float | None]:
    """The (eta, eta_sigma_max) a sampler takes when no eta is given: none for ddpm, ancestral at every step
    already; DEFAULT_STEP_NOISE for ddim and dpmpp_2m."""
    return (0.0, None) if sampler == "ddpm" else DEFAULT_STEP_NOISE


# (scale, sigma_lo, sigma_hi) of the prompt's annealing (CADS): against none, on the stages of two default runs, it
# drew fewer pixel-space near-copies and a lower FD in the judge's space every time, the colour kept, parts per
# sample a hair up and the pictures alike by eye (docs/results/quality)
DEFAULT_CONDITION_NOISE = (0.25, 2.6, 18.0)


@dataclass
class GenerationSettings:
    """How to sample; the defaults are the project's recommended fast setting."""

    # From the sampling sweep on the default run (docs/results/quality): guided at every level, the scale trades
    # colour adherence against near-copies of training images; guided only at the middle noise levels, 4 follows
    # the colour better than 3 at every level and copies less than 2 at every level.
    guidance_scale: float = 4.0
    guidance_rescale: float = 0.7  # 0: plain classifier-free guidance (see diffusion.guidance.rescale_guided)
    # (sigma_lo, sigma_hi): guide only at noise levels in between (diffusion.guidance.guidance_scale_table);
    # None guides at every level
    guidance_interval: tuple[float, float] | None = (0.28, 7.5)
    # The scale above the interval's top (1: the prompt's prediction alone); needs an interval with a finite top
    guidance_scale_above: float = 1.0
    # A multistep sampler (dpmpp_2m) steps first order where the interval begins or ends rather than extrapolate
    # from the other side's prediction (diffusion.guidance.guidance_edges)
    first_order_at_guidance_edges: bool = False
    steps: int = 25
    sampler: str = "dpmpp_2m"  # "ddim" | "ddpm" | "dpmpp_2m"
    # How the steps spread over the noise levels: "trailing" (Lin et al. 2024) or "karras" (Karras et al. 2022,
    # down to the least noisy level; diffusion.schedule.NoiseSchedule.sampling_timesteps)
    timestep_spacing: str = "trailing"
    # Step noise of ddim and dpmpp_2m (0: deterministic; 1: as much as ancestral ddpm, which refuses eta > 0), only
    # at the steps that start at sigma <= eta_sigma_max (None: every step). eta None is the recommended noise:
    # DEFAULT_STEP_NOISE for ddim and dpmpp_2m, none for ddpm (ancestral already).
    eta: float | None = None
    eta_sigma_max: float | None = None
    # (scale, sigma_lo, sigma_hi): anneal the prompt with noise above sigma_lo, wholly noise from sigma_hi up (CADS;
    # diffusion.guidance.cfg_denoiser); None keeps the prompt at every level
    condition_noise: tuple[float, float, float] | None = DEFAULT_CONDITION_NOISE
    # Autoguidance (Karras et al. 2024; diffusion.guidance.cfg_denoiser): a UNet stage folder, a weaker model on the
    # same VAE and CLIP at the same resolution (pipelines.stages.check_guide), guided away from on the prompt at
    # autoguidance_scale, beside classifier-free guidance at guidance_scale (1: autoguidance alone); None: none
    guide_unet: str | None = None
    autoguidance_scale: float = DEFAULT_AUTOGUIDANCE_SCALE
    size: int = 512
    negative_prompt: str = ""
    batch_size: int = 16  # prompts per UNet call (the guidance pass doubles it)
    # On CUDA, replay the UNet from a CUDA graph per batch shape (1.45x on 50-step DDIM, H100); off to debug or compare
    cuda_graph: bool = True
    # torch.compile the UNet (fuses its norm and pointwise passes): faster steps after about a minute of
    # compiling per batch shape, once per stack (docs/BENCHMARKS.md): for servers, not for one grid
    compile_unet: bool = False

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler '{self.sampler}'; choose one of {sorted(SAMPLERS)}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise UserError(f"unknown timestep spacing '{self.timestep_spacing}'; choose one of "
                            f"{list(TIMESTEP_SPACINGS)}")
        if self.eta is None:  # the recommended noise, below the given limit or the recommended one
            self.eta, sigma_max = default_step_noise(self.sampler)
            if self.eta_sigma_max is None:
                self.eta_sigma_max = sigma_max
        if self.size < 1:  # what else fits depends on the stages: pipelines.stages.sampling_size
            raise UserError(f"size must be a positive number of pixels, got {self.size}")
        if self.steps < 1:
            raise UserError(f"steps must be at least 1, got {self.steps}")
        if not 0 <= self.guidance_scale < math.inf:  # NaN or inf would draw black pictures without a word
            raise UserError(f"guidance scale must be a finite number >= 0 (1: the prompt's prediction alone, 0: the "
                            f"empty prompt's), got {self.guidance_scale}")
        if not 0 <= self.guidance_rescale <= 1:
            raise UserError(f"guidance rescale must be in [0, 1] (0: plain classifier-free guidance, 1: the guided "
                            f"prediction's spread set to the prompt's), got {self.guidance_rescale}")
        if not 0 <= self.autoguidance_scale < math.inf:
            raise UserError(f"autoguidance scale must be a finite number >= 0 (1: no push away from the guide), "
                            f"got {self.autoguidance_scale}")
        if self.guidance_interval is not None:
            self.guidance_interval = tuple(float(v) for v in self.guidance_interval)  # a JSON list reads back
        if self.condition_noise is not None:
            self.condition_noise = tuple(float(v) for v in self.condition_noise)
        if self.guide_unet is not None:
            self.guide_unet = str(self.guide_unet)
            read_stage(self.guide_unet, "unet")  # a missing or other folder stops here; check_guide says if it fits
        try:  # the samplers' and the guidance's own rules, before any model is loaded
            check_eta(self.sampler, self.eta, self.eta_sigma_max)
            check_guidance_interval(self.guidance_interval, self.guidance_scale_above)
            check_condition_noise(self.condition_noise)
        except ValueError as err:
            raise UserError(str(err)) from None

    def timesteps(self, schedule: NoiseSchedule, strength: float = 1.0) -> torch.Tensor:
        """The timesteps a draw at these settings takes on ``schedule`` (``strength`` < 1: image-to-image)."""
        # A weak img2img strength leaves fewer schedule levels than steps: never take more steps than levels.
        steps = max(1, min(self.steps, round(strength * schedule.num_steps)))
        return schedule.sampling_timesteps(steps, strength, self.timestep_spacing)

    def describe(self) -> str:
        """One line for a report: sampler, steps, guidance and its levels, step noise, condition noise, size."""
        levels = "at every level" if self.guidance_interval is None else \
            "in sigma ({:g}, {:g}]".format(*self.guidance_interval) + (
                "" if self.guidance_scale_above == 1 else f", {self.guidance_scale_above:g} above it") + (
                ", first order at its edges" if self.first_order_at_guidance_edges else "")
        if self.sampler == "ddpm":  # ancestral at every step; its eta is not a setting
            noise = "ancestral step noise"
        else:
            noise = "no step noise" if self.eta == 0 else f"step noise eta {self.eta:g}" + (
                "" if self.eta_sigma_max is None else f" below sigma {self.eta_sigma_max:g}")
        annealed = "" if self.condition_noise is None else \
            ", condition noise {:g} from sigma {:g} (all noise from {:g})".format(*self.condition_noise)
        autoguided = "" if self.guide_unet is None else \
            f" and autoguidance {self.autoguidance_scale:g} away from the UNet at {self.guide_unet}"
        spacing = "" if self.timestep_spacing == "trailing" else f" ({self.timestep_spacing} spacing)"
        return (f"{self.sampler}, {self.steps} steps{spacing}, guidance {self.guidance_scale:g}{autoguided} {levels} "
                f"(rescale {self.guidance_rescale:g}), {noise}{annealed}, {self.size} px")


# --size of every command that samples; each adds its default (pipelines.stages.sampling_size checks it)
SIZE_HELP = "image side in pixels, a positive multiple of the VAE's downsampling times the UNet's"


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampler, steps and guidance options of every command that samples, defaulting to GenerationSettings'."""
    defaults = GenerationSettings()
    parser.add_argument("--sampler", default=defaults.sampler, choices=sorted(SAMPLERS))
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--timestep-spacing", default=defaults.timestep_spacing, choices=TIMESTEP_SPACINGS,
                        help="trailing: evenly in timestep, the last step from sigma ~0.2; karras: evenly in "
                             "sigma^(1/7) down to the least noisy level (default: %(default)s)")
    parser.add_argument("--eta", type=float,
                        help="step noise of ddim and dpmpp_2m: 0 deterministic, 1 as much as ancestral ddpm "
                             f"(default: {DEFAULT_STEP_NOISE[0]:g} below sigma {DEFAULT_STEP_NOISE[1]:g}; "
                             "none for ddpm)")
    parser.add_argument("--eta-sigma-max", type=float, metavar="SIGMA",
                        help="step noise only at steps that start at a noise level sigma <= SIGMA (EDM's S_tmax; "
                             f"default: {DEFAULT_STEP_NOISE[1]:g} with the default eta, every step with a given one)")
    parser.add_argument("--guidance", type=float, default=defaults.guidance_scale)
    parser.add_argument("--guidance-rescale", type=float, default=defaults.guidance_rescale,
                        help="0: plain classifier-free guidance; up to 1: the guided prediction keeps the "
                             "conditional one's spread (Lin et al. 2024)")
    interval = parser.add_mutually_exclusive_group()
    interval.add_argument("--guidance-interval", type=float, nargs=2, metavar=("SIGMA_LO", "SIGMA_HI"),
                          default=defaults.guidance_interval,
                          help="guide only at noise levels sigma in (SIGMA_LO, SIGMA_HI] (Kynkaanniemi et al. "
                               "2024), the prompt's prediction alone elsewhere (default: %(default)s)")
    interval.add_argument("--guide-every-level", dest="guidance_interval", action="store_const", const=None,
                          help="plain classifier-free guidance at every noise level (no interval)")
    parser.add_argument("--guidance-above", type=float, default=defaults.guidance_scale_above, metavar="SCALE",
                        help="the guidance scale at the noise levels above the interval, where the layout and "
                             "colour are set (1: the prompt's prediction alone; default: %(default)s)")
    parser.add_argument("--first-order-at-guidance-edges", action="store_true",
                        help="dpmpp_2m: a first-order step where the guidance interval begins or ends, not an "
                             "extrapolation from the unguided prediction")
    annealing = parser.add_mutually_exclusive_group()
    annealing.add_argument("--condition-noise", type=float, nargs=3, metavar=("SCALE", "SIGMA_LO", "SIGMA_HI"),
                           default=defaults.condition_noise,
                           help="anneal the prompt (CADS, Sadat et al. 2024): noise of SCALE mixed into the text "
                                "states above SIGMA_LO, the states wholly noise from SIGMA_HI up "
                                "(default: %(default)s)")
    annealing.add_argument("--no-condition-noise", dest="condition_noise", action="store_const", const=None,
                           help="keep the prompt at every noise level (no annealing)")
    parser.add_argument("--guide-unet", metavar="FOLDER",
                        help="autoguidance (Karras et al. 2024): also guide away from this weaker UNet on the prompt "
                             "(trained on the same VAE and CLIP at the same resolution); --guidance 1 for "
                             "autoguidance alone (default: none)")
    parser.add_argument("--autoguidance", type=float, metavar="SCALE",
                        help=f"the push away from --guide-unet's UNet (1: none; default "
                             f"{defaults.autoguidance_scale:g})")


def sampling_settings(args: argparse.Namespace, **more: Any) -> GenerationSettings:
    """GenerationSettings from the options of :func:`add_sampling_arguments`, plus ``more`` fields."""
    if args.autoguidance is not None and args.guide_unet is None:  # it would change nothing, silently
        raise UserError("--autoguidance sets the push away from --guide-unet's UNet; add --guide-unet FOLDER or "
                        "drop --autoguidance")
    autoguidance = GenerationSettings.autoguidance_scale if args.autoguidance is None else args.autoguidance
    return GenerationSettings(sampler=args.sampler, steps=args.steps, timestep_spacing=args.timestep_spacing,
                              eta=args.eta, eta_sigma_max=args.eta_sigma_max,
                              guidance_scale=args.guidance, guidance_rescale=args.guidance_rescale,
                              guidance_interval=args.guidance_interval,
                              guidance_scale_above=args.guidance_above,
                              first_order_at_guidance_edges=args.first_order_at_guidance_edges,
                              condition_noise=args.condition_noise,
                              guide_unet=args.guide_unet, autoguidance_scale=autoguidance, **more)


def generate(stack: StageStack, prompts: Sequence[str], seeds: Sequence[int], settings: GenerationSettings | None = None,
             init_images: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    """Images in [-1, 1], ``[len(prompts), 3, size, size]``.

    With ``init_images`` ([-1, 1], any square size) this is image-to-image: the init is encoded, noised to
    the level ``strength`` in (0, 1] and denoised from there; ``strength`` near 0 returns the init.
    """
    return generate_with_latents(stack, prompts, seeds, settings, init_images, strength)[0]


@torch.no_grad()
def generate_with_latents(stack: StageStack, prompts: Sequence[str], seeds: Sequence[int],
                          settings: GenerationSettings | None = None, init_images: torch.Tensor | None = None,
                          strength: float = 1.0, callback: StepCallback | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`generate`, also returning the sampled latents ``[len(prompts), C, size/f, size/f]`` (the UNet's,
    before ``LatentNormalisation.denormalise``). ``callback`` sees every sampling step of each batch of
    ``settings.batch_size`` prompts, in order: (step index, x after the step, the step's guided x0_hat), the UNet's
    latents as the sampler holds them (``benchmarks.colour_trajectory`` decodes each x0_hat)."""
    settings = settings or GenerationSettings()
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    if init_images is not None and not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if init_images is not None and len(init_images) != len(prompts):
        raise ValueError(f"got {len(init_images)} init images for {len(prompts)} prompts; give one per prompt "
                         "(expand a single image to every prompt)")
    sampling_size(settings.size, stack.infos["vae"].model, stack.infos["unet"].model, stack.image_size, "size")
    device = stack.device
    latent_size = settings.size // stack.vae.downsample_factor
    shape = (stack.vae.latent_channels, latent_size, latent_size)
    if init_images is None:
        strength = 1.0
    timesteps = settings.timesteps(stack.schedule, strength)
    autocast = inference_autocast(device)
    model = stack.unet_call(settings.cuda_graph, settings.compile_unet)
    guide = None if settings.guide_unet is None else stack.guide_call(settings.guide_unet, settings.cuda_graph)
    # one negative prompt for every sample: encoded once (in fp32, as training's cache), broadcast by the guidance
    uncond = stack.clip.text_states([settings.negative_prompt])
    decode = lambda latents: stack.vae.decode(stack.latent_normalisation.denormalise(latents))  # noqa: E731

    outputs, all_latents = [], []
    for start in range(0, len(prompts), settings.batch_size):
        batch_prompts = list(prompts[start:start + settings.batch_size])
        batch_seeds = list(seeds[start:start + settings.batch_size])
        cond = stack.clip.text_states(batch_prompts)
        # One generator per seed for the starting and the step noise: an image depends on its own seed only.
        per_sample = PerSampleNoise(batch_seeds)
        noise = per_sample.initial(shape, device)
        if init_images is None:
            x = noise
        else:
            init = resize(init_images[start:start + settings.batch_size].to(device).float(), settings.size)
            with autocast:
                latents = stack.latent_normalisation.normalise(stack.vae.encode(init).mode().float())
            t0 = timesteps[:1].expand(len(batch_prompts)).to(device)
            x = stack.schedule.add_noise(latents, noise, t0)

        images, latents = guided_sample_and_decode(
            model, decode, stack.schedule, stack.prediction_type, cond, uncond, settings.guidance_scale, x,
            timesteps, settings.sampler, per_sample, settings.eta, settings.eta_sigma_max, decode_context=autocast,
            guidance_rescale=settings.guidance_rescale, guidance_interval=settings.guidance_interval,
            condition_noise=settings.condition_noise, guide_model=guide,
            autoguidance_scale=settings.autoguidance_scale,
            first_order_at_guidance_edges=settings.first_order_at_guidance_edges,
            guidance_scale_above=settings.guidance_scale_above, callback=callback)
        outputs.append(images.clamp(-1, 1))
        all_latents.append(latents)
    return torch.cat(outputs), torch.cat(all_latents)


def draw_showcase(stack: StageStack, settings: GenerationSettings, path: str | Path, seeds: int = SHOWCASE_SEEDS,
                  tile: int = 128) -> Path:
    """The showcase prompts (rows) x seeds ``0..seeds-1`` (columns) at ``settings``, saved as a grid of ``tile``-px
    tiles: a run's ``final_samples.png``, the sampling sweep's picture of each setting and a study's blocks, so
    that pictures of one run at different settings, or of different runs, compare seed for seed."""
    prompts = [prompt for prompt in SHOWCASE_PROMPTS for _ in range(seeds)]
    return save_grid(generate(stack, prompts, [i % seeds for i in range(len(prompts))], settings), path, nrow=seeds,
                     max_side=tile)


def showcase_layout(seeds: int = SHOWCASE_SEEDS) -> str:
    """How a :func:`draw_showcase` picture reads, for the reports that show one."""
    return "rows: " + "; ".join(f"`{prompt}`" for prompt in SHOWCASE_PROMPTS) + f"; columns: seeds 0–{seeds - 1}"


def pil_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """A PIL image -> [-1, 1] float [3, size, size] (upright, transparency on white, centre-cropped to a square),
    decoded as the training images are (``data.captions.to_rgb``)."""
    return to_float(square_resize(to_rgb(image), size))


def saved_images(folder: str | Path, stem: str = "image") -> list[Path]:
    """The images an earlier :func:`save_images` left in ``folder`` (``stem_N.png``), in name order."""
    folder = Path(folder)
    pattern = re.compile(rf"{re.escape(stem)}_[0-9]+\.png")
    return sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name)) if folder.is_dir() else []


def save_images(images: Sequence[Image.Image], folder: str | Path, stem: str = "image") -> list[Path]:
    """Save each image as ``folder/stem_N.png``, N zero-padded to the count (at least two digits) so that names
    sort in order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digits = max(2, len(str(len(images) - 1)))
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{stem}_{i:0{digits}d}.png")
        image.save(paths[-1])
    return paths


__all__ = ["GenerationSettings", "add_sampling_arguments", "draw_showcase", "generate", "generate_with_latents",
           "pil_to_tensor", "sampling_settings", "save_grid", "save_images", "saved_images", "showcase_layout"]

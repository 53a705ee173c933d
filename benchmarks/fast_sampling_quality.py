"""What a faster sampler costs: the same trained model, prompts and seeds through the reference sampler
(DDIM, 50 steps) and through cheaper settings, compared image for image.

Only meaningful for a trained stack (``--run``): a random-init UNet predicts no structure to lose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from clip.model import CLIPModel
from pipelines.evaluate import judge_features
from pipelines.metrics import frechet_distance
from pipelines.prompts import GRID_PROMPTS
from pipelines.stages import StageStack
from pipelines.text_to_image import GenerationSettings, generate_with_latents


@dataclass(frozen=True)
class SamplerSetting:
    sampler: str
    steps: int

    @property
    def label(self) -> str:
        return f"{self.sampler}-{self.steps}"


def sample_latents_and_images(stack: StageStack, setting: SamplerSetting, prompts: list[str], seeds: list[int],
                              guidance_scale: float, batch_size: int) -> tuple[Tensor, Tensor]:
    """Latents [N, C, h, w] and images in [-1, 1] (float32, CPU) for one prompt and seed per row, through
    ``pipelines.generate`` at the UNet's training resolution."""
    # deterministic (eta 0): the difference to the reference is the solver's, not fresh step noise's
    settings = GenerationSettings(guidance_scale=guidance_scale, steps=setting.steps, sampler=setting.sampler,
                                  eta=0.0, size=stack.infos["unet"].training["resolution"], batch_size=batch_size)
    images, latents = generate_with_latents(stack, prompts, seeds, settings)
    return latents.cpu(), images.cpu()


def _rms(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).square().mean().sqrt())


def fast_sampling_quality(stack: StageStack, judge: CLIPModel | None, reference: SamplerSetting,
                          candidates: list[SamplerSetting], num_images: int, guidance_scale: float,
                          batch_size: int) -> dict:
    """Per candidate: latent and pixel RMS difference to the reference's images of the same seeds, and, with
    a judge CLIP stage, the Fréchet distance and mean cosine between the two sets' judge features."""
    prompts = [GRID_PROMPTS[i % len(GRID_PROMPTS)] for i in range(num_images)]
    seeds = list(range(num_images))
    ref_latents, ref_images = sample_latents_and_images(stack, reference, prompts, seeds, guidance_scale, batch_size)
    ref_features = judge_features(judge, ref_images) if judge is not None else None
    results = {}
    for setting in candidates:
        latents, images = sample_latents_and_images(stack, setting, prompts, seeds, guidance_scale, batch_size)
        row = {"latent_rms_diff": _rms(latents, ref_latents), "pixel_rms_diff": _rms(images, ref_images)}
        if ref_features is not None:
            features = judge_features(judge, images)
            row["judge_fd"] = frechet_distance(ref_features, features)
            row["judge_cosine"] = float(F.cosine_similarity(ref_features, features).mean())
        results[setting.label] = row
    return {"reference": reference.label, "num_images": num_images, "guidance_scale": guidance_scale,
            "guidance_interval": GenerationSettings.guidance_interval, "prompts": list(GRID_PROMPTS),
            "vs_reference": results,
            "scale": "latents: the UNet's scaled latents; pixels: [-1, 1] (RMS 2 = opposite colours everywhere)"}

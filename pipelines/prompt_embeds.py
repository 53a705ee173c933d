"""Our text encoder in front of a diffusers pipeline: prompts -> ``prompt_embeds`` / ``negative_prompt_embeds``.

Our bilingual CLIP and BPE tokenizer have no diffusers twin, so an exported pipeline (``pipelines.export``)
has no text encoder. Encode the prompts here and hand the states to it::

    from diffusers import StableDiffusionPipeline
    from clip.model import CLIPModel
    from pipelines.prompt_embeds import prompt_embeds

    pipe = StableDiffusionPipeline.from_pretrained("exported/NAME", text_encoder=None, tokenizer=None)
    clip = CLIPModel.load("exported/NAME/scratch_clip")
    cond, uncond = prompt_embeds(clip, ["a red dragon pokemon", "一只蓝色的鸟宝可梦"])
    images = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=25,
                  guidance_scale=4.0, guidance_rescale=0.7).images

(DDIM guided at every level: a relation of ``pipelines.generate``'s default, not the same sampling.)

The states are the ones ``pipelines.generate`` conditions on: float32, encoded without autocast, as training
caches them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from clip.model import CLIPModel


@torch.no_grad()
def prompt_embeds(clip: CLIPModel, prompts: Sequence[str], negative_prompt: str = "") -> tuple[Tensor, Tensor]:
    """``(prompt_embeds, negative_prompt_embeds)``, both ``[len(prompts), context_length, text_width]`` float32
    on the encoder's device; the one negative prompt (empty: the unconditional state) serves every prompt."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings; wrap a single prompt as [prompt]")
    cond, uncond = clip.text_states(list(prompts)), clip.text_states([negative_prompt])  # float32 (text_states)
    return cond, uncond.expand_as(cond).contiguous()

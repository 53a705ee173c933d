"""Symmetric InfoNCE loss of CLIP and the training module the engine drives.

The loss is a pure function of the embeddings of the whole (global) batch. With several processes each one
all-gathers the embeddings through `torch.distributed.nn.functional.all_gather`, whose backward returns to
every process the gradient of its own rows, so negatives span all GPUs and gradients stay exact: every rank
computes the same global loss, the gather's backward sums the world_size identical contributions and DDP's
gradient averaging divides them out again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor, nn

from clip.model import CLIPModel


def gather_across_ranks(x: Tensor) -> Tensor:
    """Rows of `x` from every process, concatenated in rank order (gradients flow); `x` itself when alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(dist_nn.all_gather(x), dim=0)


def duplicate_mask(tokens: Tensor, image_ids: Tensor | None = None) -> Tensor:
    """[B, B] bool, True where two rows hold the identical caption or (given `image_ids`) the same source image.

    Either way the other row is no true negative: an identical caption describes both images, and the same
    image under another caption (English and Chinese, or two copies drawn into one batch) matches both.
    """
    duplicates = (tokens[:, None, :] == tokens[None, :, :]).all(dim=-1)
    if image_ids is not None:
        duplicates |= image_ids[:, None] == image_ids[None, :]
    return duplicates


def contrastive_loss(image_embed: Tensor, text_embed: Tensor, scale: Tensor, duplicates: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE between row-aligned image and text embeddings [B, E].

    `scale` multiplies the cosine similarities (exp of the learned logit scale). Off-diagonal pairs marked in
    `duplicates` (see `duplicate_mask`) are masked out of both softmaxes: they are neither positives nor
    negatives. Masking keeps exactly one positive per row, so with all logits equal row i's loss is the log
    of the number of candidates left to it.
    """
    if image_embed.shape != text_embed.shape or image_embed.dim() != 2:
        raise ValueError(f"need image and text embeddings of one shape [B, E], got {tuple(image_embed.shape)} "
                         f"and {tuple(text_embed.shape)}")
    # bf16 logits at scale up to 100 lose ~0.4 per logit; the B x B loss is tiny, so run it in fp32.
    with torch.autocast(device_type=image_embed.device.type, enabled=False):
        image = F.normalize(image_embed.float(), dim=-1)
        text = F.normalize(text_embed.float(), dim=-1)
        logits = scale.float() * image @ text.T
        if duplicates is not None:
            other = ~torch.eye(len(logits), dtype=torch.bool, device=logits.device)
            logits = logits.masked_fill(duplicates & other, float("-inf"))
        labels = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class CLIPTrainingModule(nn.Module):
    """Wraps the model and the loss so DDP sees a single forward.

    batch: {"images": float [B, 3, S, S] in [-1, 1] (already augmented), "tokens": long [B, context_length],
    "image_ids": long [B] (optional) source row of each image, so repeats of one image are not negatives}.
    """

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():  # the parameter itself, as open_clip clamps it after each step: clamped in the
            # forward pass alone its gradient is 0 above the cap, and a scale that got there could never come down
            self.model.logit_scale.clamp_(max=self.model.config.logit_scale_max)
        image_embed = self.model.encode_image(batch["images"])
        _, text_embed = self.model.encode_text(batch["tokens"])
        scale = self.model.temperature_scale()
        image_all, text_all = gather_across_ranks(image_embed), gather_across_ranks(text_embed)
        image_ids = batch.get("image_ids")
        duplicates = duplicate_mask(gather_across_ranks(batch["tokens"]),
                                    None if image_ids is None else gather_across_ranks(image_ids))
        loss = contrastive_loss(image_all, text_all, scale, duplicates)
        return loss, {"logit_scale": scale.detach()}  # the engine logs the loss itself

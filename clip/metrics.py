"""Retrieval metrics on held-out pairs: does caption i find image i among all validation images, and back?"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from clip.loss import duplicate_mask
from clip.model import CLIPModel

RECALL_AT = (1, 5, 10)


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode while the block runs, its own mode back after (a measurement between training
    steps leaves dropout as it found it)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def recall_at_k(similarity: Tensor, equivalent: Tensor | None = None, ks: tuple[int, ...] = RECALL_AT) -> dict[int, float]:
    """similarity [N queries, N candidates], the right candidate of query i being i -> {k: fraction found in top k}.

    `equivalent` [N, N] bool marks candidates that are right as well (pairs with identical captions). A
    query's rank counts the wrong candidates scoring at least as high as its best right one: ties count
    against the query, so a collapsed model that scores everything alike gets recall 0, not 1.
    """
    right = torch.eye(len(similarity), dtype=torch.bool, device=similarity.device)
    if equivalent is not None:
        right |= equivalent
    best_right = similarity.masked_fill(~right, float("-inf")).amax(dim=1, keepdim=True)
    rank = ((similarity >= best_right) & ~right).sum(dim=1)
    return {k: (rank < k).float().mean().item() for k in ks}


@torch.no_grad()
def cosine_similarities(queries: Tensor, keys: Tensor) -> Tensor:
    """``[len(queries), len(keys)]`` cosine similarities in float32, autocast or not: in bf16 neighbouring
    similarities tie (steps of ~0.004 near 1), and recall counts a tie against the query."""
    with torch.autocast(device_type=queries.device.type, enabled=False):
        return F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T


def retrieval_metrics(model: CLIPModel, images: Tensor, captions: dict[str, list[str]], batch_size: int = 256) -> dict[str, float]:
    """Text->image (t2i) and image->text (i2t) recall@1/5/10 per caption language, plus the logit scale.

    images: float [N, 3, S, S] in [-1, 1] on the model's device; captions: {"en": [...N], "zh": [...N]}.
    Keys look like "t2i_r5_en", "i2t_r1_zh". Images whose captions are identical count as right for each
    other. The model is evaluated in eval mode and its mode restored.
    """
    with evaluating(model):
        image_embed = torch.cat([model.encode_image(chunk) for chunk in images.split(batch_size)])
        metrics: dict[str, float] = {}
        for language, texts in captions.items():
            if len(texts) != len(images):
                raise ValueError(f"{len(texts)} {language} captions for {len(images)} images; they must pair up")
            tokens = model.tokenizer.encode(texts).to(images.device)
            text_embed = torch.cat([model.encode_text(chunk)[1] for chunk in tokens.split(batch_size)])
            similarity = cosine_similarities(text_embed, image_embed)  # [texts, images]
            same_caption = duplicate_mask(tokens)
            for direction, sim in (("t2i", similarity), ("i2t", similarity.T)):
                for k, value in recall_at_k(sim, same_caption).items():
                    metrics[f"{direction}_r{k}_{language}"] = value
        metrics["logit_scale"] = model.temperature_scale().item()
        return metrics

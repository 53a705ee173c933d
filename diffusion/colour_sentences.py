"""The UNet stage's training captions: each followed by a sentence naming its body's colour, measured from the
pixels ("Its body is mostly red." / "它的身体主要是红色。"), and the fingerprint that records them.

In this data colour words mostly name details ("red eyes"); the sentence ties them to the body too. A leaf module
(no training code), so the run's and a study's checks can build the captions a UNet stage would train on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor

from clip.model import TOKENIZER_FILE
from clip.tokenizer import BPETokenizer
from data import CaptionSet, load_captions
from data.augment import to_float
from data.captions import clause_prefixes, texts_fingerprint
from diffusion.config import UNetTrainConfig
from engine.stage import read_stage
from pipelines.metrics import COLOUR_FAMILIES, hue_family_shares

COLOUR_SENTENCE_MIN_SHARE = 0.5  # of a training image's coloured pixels in one hue family, to name its body colour


def with_colour_sentences(images: Tensor, en: list[str], zh: list[str],
                          fits: Callable[[str], bool] = lambda text: True) -> tuple[list[str], list[str]]:
    """The captions of ``images`` (uint8), each followed by a sentence that names the hue family most of the
    creature's coloured pixels have ("Its body is mostly red." / "它的身体主要是红色。") when one family holds
    at least ``COLOUR_SENTENCE_MIN_SHARE`` of them. A caption whose text with the sentence does not ``fit`` (the
    text encoder's context) loses its last clauses instead, so the encoder never cuts the sentence off."""
    en_out, zh_out = list(en), list(zh)
    for i, index in enumerate(body_colours(images)):
        if index is not None:
            _, en_word, zh_word, _ = COLOUR_FAMILIES[index]
            en_out[i] = _with_sentence(en[i], f" Its body is mostly {en_word}.", fits)
            zh_out[i] = _with_sentence(zh[i], f"它的身体主要是{zh_word}。", fits)
    return en_out, zh_out


def body_colours(images: Tensor) -> list[int | None]:
    """Per image (uint8): the index in ``COLOUR_FAMILIES`` of the hue family holding at least
    ``COLOUR_SENTENCE_MIN_SHARE`` of its coloured pixels (the body colour its sentence names), else None."""
    shares = torch.cat([hue_family_shares(to_float(chunk)) for chunk in images.split(64)])
    share, family = shares.max(dim=1)
    return [index if top >= COLOUR_SENTENCE_MIN_SHARE else None for top, index in zip(share.tolist(), family.tolist())]


def _with_sentence(caption: str, sentence: str, fits: Callable[[str], bool]) -> str:
    """``caption`` + ``sentence``, or the longest clause prefix of ``caption`` that fits with it (the whole
    caption when none does: the sentence alone would drop the caption's every word)."""
    for body in (caption.rstrip(), *clause_prefixes(caption)):
        if fits(body + sentence):
            return body + sentence
    return caption.rstrip() + sentence


def training_captions(cfg: UNetTrainConfig, train_set: CaptionSet, clip_dir: str | Path
                      ) -> tuple[list[str], list[str]]:
    """The (English, Chinese) captions both phases of the stage train on: ``train_set``'s (loaded at the stage's
    resolution), each with its colour sentence when ``cfg.colour_sentences``, trimmed to the context of the CLIP
    stage at ``clip_dir``. Measured once at the stage's resolution: at each phase's own, a few borderline images
    would change colour between the phases."""
    if not cfg.colour_sentences:
        return list(train_set.en), list(train_set.zh)
    context = read_stage(clip_dir, "clip").model["context_length"]
    tokenizer = BPETokenizer.load(Path(clip_dir) / TOKENIZER_FILE, context)
    return with_colour_sentences(train_set.images, train_set.en, train_set.zh,
                                 fits=lambda text: tokenizer.dropped_tokens(text) == 0)


def derived_inputs(cfg: UNetTrainConfig, data_source: str, upstream: Mapping[str, str | Path | None]
                   ) -> dict[str, str]:
    """The inputs a UNet stage trained now records that its settings and ``upstream`` folders ("vae", "clip") do
    not name, for ``pipelines.stages.finished_stage_differences``' ``derived``: ``trained_captions``, the
    fingerprint of its ``training_captions`` (a rule change, not only a data change, changes it). ``{}`` while
    an upstream stage (None) is about to be trained again: the UNet trains again with it, so nothing is measured."""
    if None in upstream.values():
        return {}
    train_set = load_captions(data_source, resolution=cfg.resolution).subset("train")
    return {"trained_captions": texts_fingerprint(*training_captions(cfg, train_set, upstream["clip"]))}

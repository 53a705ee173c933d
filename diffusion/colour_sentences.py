"""The UNet stage's training captions: each followed by a sentence naming its body's colour, measured from the
pixels ("Its body is mostly red." / "它的身体主要是红色。"), with the recoloured copies' captions
(``diffusion.recolour``) after them, and the fingerprint that records them.

In this data colour words mostly name details ("red eyes"); the sentence ties them to the body too. A leaf module
(no training code), so the run's and a study's checks can build the captions a UNet stage would train on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor

from clip.model import TOKENIZER_FILE
from clip.tokenizer import BPETokenizer
from data import CaptionSet, load_captions
from data.augment import to_float
from data.captions import clause_prefixes, is_chinese, texts_fingerprint
from diffusion.config import UNetTrainConfig
from diffusion.recolour import (RecolourAugment, family_map, hue_family, hue_turns, recoloured_images, recolourable,
                               rename_colours)
from diffusion.twins import silhouette_twins, twins_record
from engine.stage import read_stage
from pipelines.metrics import COLOUR_FAMILIES, FAMILY_NAMES, hue_family_shares, in_hue_family, pixel_hues

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
            en_out[i] = _with_sentence(en[i], index, "en", fits)
            zh_out[i] = _with_sentence(zh[i], index, "zh", fits)
    return en_out, zh_out


def colour_sentence(family: int, language: str) -> str:
    """The sentence naming the body colour ``COLOUR_FAMILIES[family]`` in ``language`` ("en" or "zh")."""
    _, en_word, zh_word, _ = COLOUR_FAMILIES[family]
    return f"Its body is mostly {en_word}." if language == "en" else f"它的身体主要是{zh_word}。"


def with_body_colour(prompt: str, colour: str, fits: Callable[[str], bool] = lambda text: True) -> str:
    """``prompt`` followed by the colour sentence that names ``colour`` (a hue family of ``COLOUR_FAMILIES``) as
    the body's, in the prompt's language (Chinese when it has a CJK ideograph), as ``with_colour_sentences`` ends
    a training caption: after a full stop (the Pokémon captions all end with one; a prompt without gets one), and
    a prompt too long to ``fit`` with it loses its last clauses, not the sentence. A colour word inside a prompt
    may go to a detail, as it mostly does in this data ("red eyes"); the sentence names the body's."""
    if colour not in FAMILY_NAMES:
        raise ValueError(f"unknown body colour {colour!r}: use one of {', '.join(FAMILY_NAMES)}")
    chinese = is_chinese(prompt)
    family, language = FAMILY_NAMES.index(colour), "zh" if chinese else "en"
    body = prompt.strip()
    if not body:
        return colour_sentence(family, language)
    if not body.endswith((".", "。", "!", "！", "?", "？")):
        body += "。" if chinese else "."
    return _with_sentence(body, family, language, fits)


_COLOUR_SENTENCES = tuple(colour_sentence(family, language) for family in range(len(COLOUR_FAMILIES))
                          for language in ("en", "zh"))


def ends_with_colour_sentence(caption: str) -> bool:
    """Whether ``caption`` ends with a colour sentence (``with_colour_sentences``), in either language."""
    return caption.endswith(_COLOUR_SENTENCES)


def body_colours(images: Tensor) -> list[int | None]:
    """Per image (uint8): the index in ``COLOUR_FAMILIES`` of the hue family holding at least
    ``COLOUR_SENTENCE_MIN_SHARE`` of its coloured pixels (the body colour its sentence names), else None."""
    shares = torch.cat([hue_family_shares(to_float(chunk)) for chunk in images.split(64)])
    share, family = shares.max(dim=1)
    return [index if top >= COLOUR_SENTENCE_MIN_SHARE else None for top, index in zip(share.tolist(), family.tolist())]


def body_hues(images: Tensor, bodies: list[int | None]) -> list[float | None]:
    """Per image (uint8): the circular mean hue (degrees) of its coloured pixels in its body's family
    ``bodies[i]`` (``body_colours``), None where it has none."""
    hues: list[float | None] = []
    for start in range(0, len(images), 64):
        hue, chromatic, _ = pixel_hues(to_float(images[start:start + 64]))
        for pixels, reliable, family in zip(hue, chromatic, bodies[start:start + 64]):
            if family is None:
                hues.append(None)
                continue
            angles = torch.deg2rad(pixels[reliable & in_hue_family(pixels, family)])
            hues.append(math.degrees(math.atan2(angles.sin().sum(), angles.cos().sum())) % 360)
    return hues


def _with_sentence(caption: str, family: int, language: str, fits: Callable[[str], bool]) -> str:
    """``caption`` + the colour sentence of ``family`` in ``language`` (after a space in English), or the longest
    clause prefix of ``caption`` that fits with it (the whole caption when none does: the sentence alone would drop
    the caption's every word)."""
    sentence = (" " if language == "en" else "") + colour_sentence(family, language)
    for body in (caption.rstrip(), *clause_prefixes(caption)):
        if fits(body + sentence):
            return body + sentence
    return caption.rstrip() + sentence


@dataclass(frozen=True)
class TrainingCaptions:
    """What the UNet stage's text states are built from: the training images' captions, then each recoloured
    copy's (copy ``k`` of image ``i`` at ``N + k * N + i``), and the hue turns ``[copies, N]`` that made the
    copies (``diffusion.recolour.hue_turns``; no rows when the stage does not recolour)."""

    en: list[str]
    zh: list[str]
    hue_turns: Tensor

    @property
    def fingerprint(self) -> str:
        return texts_fingerprint(self.en, self.zh)


def training_captions(cfg: UNetTrainConfig, train_set: CaptionSet, clip_dir: str | Path) -> TrainingCaptions:
    """The captions both phases of the stage train on: ``train_set``'s (loaded at the stage's resolution), with
    ``cfg.recolour.copies`` recoloured copies' renamed captions after them, each with its colour sentence when
    ``cfg.colour_sentences``, trimmed to the context of the CLIP stage at ``clip_dir``. Measured once at the
    stage's resolution (at each phase's own, a few borderline images would change colour between the phases), and
    on the CPU, where a run's pre-check measures them too: the fingerprints must agree to the bit."""
    copies, copies_en, copies_zh, turns = recoloured_copies(train_set.images, train_set.en, train_set.zh,
                                                            cfg.recolour)
    images = torch.cat([train_set.images, copies]) if len(copies) else train_set.images
    en, zh = list(train_set.en) + copies_en, list(train_set.zh) + copies_zh
    if cfg.colour_sentences:
        context = read_stage(clip_dir, "clip").model["context_length"]
        tokenizer = BPETokenizer.load(Path(clip_dir) / TOKENIZER_FILE, context)
        en, zh = with_colour_sentences(images, en, zh, fits=tokenizer.fits)
    return TrainingCaptions(en, zh, turns)


def recoloured_copies(images: Tensor, en: list[str], zh: list[str], recolour: RecolourAugment
                      ) -> tuple[Tensor, list[str], list[str], Tensor]:
    """``recolour.copies`` recoloured copies of every image (uint8, copy ``k`` of image ``i`` at ``k * N + i``,
    turned on the CPU), their renamed English and Chinese captions, and the hue turns ``[copies, N]`` that made
    them (``diffusion.recolour``); no copies when ``recolour.copies`` is 0. A copy whose turned body does not
    measure as the family it was turned to (its hues spread over two families) is the image as it is, so a renamed
    caption never contradicts its colour sentence."""
    if not recolour.copies:
        return images[:0], [], [], torch.zeros(0, len(images))
    bodies = body_colours(images)
    hues = body_hues(images, bodies)
    can_recolour = [recolourable(en[i], zh[i], body) for i, body in enumerate(bodies)]
    turns = hue_turns(bodies, hues, can_recolour, recolour.copies, recolour.seed)
    copies = recoloured_images(images, turns)
    n = len(images)
    for row, landed in enumerate(body_colours(copies)):
        k, i = divmod(row, n)
        if turns[k, i] and landed != hue_family(hues[i] + float(turns[k, i])):
            turns[k, i] = 0.0
            copies[row] = images[i]
    renamed = [rename_colours(en[i], zh[i], family_map(turn, bodies[i], hues[i])) if turn else (en[i], zh[i])
               for copy in turns.tolist() for i, turn in enumerate(copy)]  # a turn of 0: not recoloured
    return copies, [e for e, _ in renamed], [z for _, z in renamed], turns


def derived_inputs(cfg: UNetTrainConfig, data_source: str, upstream: Mapping[str, str | Path | None]
                   ) -> dict[str, str]:
    """The inputs a UNet stage trained now records that its settings and ``upstream`` folders ("vae", "clip") do
    not name, for ``pipelines.stages.finished_stage_differences``' ``derived``: ``trained_captions``, the
    fingerprint of its ``training_captions``, and with ``balance_twins`` its ``twin_groups`` (a rule change, not
    only a data change, changes either). ``{}`` while an upstream stage (None) is about to be trained again: the
    UNet trains again with it, so nothing is measured."""
    if None in upstream.values():
        return {}
    data = load_captions(data_source, resolution=cfg.resolution)
    return derived_record(training_captions(cfg, data.subset("train"), upstream["clip"]),
                          silhouette_twins(data) if cfg.balance_twins else None)


def derived_record(captions: TrainingCaptions, twins: list[list[int]] | None) -> dict[str, str]:
    """The derived inputs as a UNet stage records them in ``trained_on`` (and ``derived_inputs`` asks for them):
    ``trained_captions``, what its text states were built from (a resume onto captions whose colour sentences or
    trimming changed, a code change and not a data change, is refused like one onto other data), and with
    ``twins`` (``balance_twins``) its ``twin_groups``."""
    record = {"trained_captions": captions.fingerprint}
    if twins is not None:
        record["twin_groups"] = twins_record(twins)
    return record

"""Recoloured training copies: a training image with its hue turned so its body takes another colour family, and
its captions with every colour word renamed by the same turn ("a red bird with yellow eyes" turned from red to
blue: "a blue bird with purple eyes").

The training set's bodies are unevenly coloured (few purple ones; docs/results/quality), so a colour the set
rarely draws can only be drawn near its few examples. A recoloured copy draws every body in every colour
its caption then names, so colour words are learnt apart from shapes. The caption carries the change (it names
the new colours), so no conditioning label is needed for the copies not to leak: the samples are asked for the
colours the prompt names. Leaf module: the rules only; ``diffusion.colour_sentences`` builds the copies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from data.augment import rotate_hue
from engine.config import ConfigError
from pipelines.metrics import COLOUR_FAMILIES, in_hue_family

RECOLOUR_VERSION = 2  # bump when the rules below change what a copy or its caption is

def _centre(start: float, end: float) -> float:
    return (start + (end - start) % 360 / 2) % 360  # (345, 15) wraps round 0: its centre is 0


# Each family's hue at the middle of its range, and half its width: a body's measured hue is turned to near its
# target family's centre.
FAMILY_CENTRES = tuple(_centre(*hue_range) for *_, hue_range in COLOUR_FAMILIES)
FAMILY_HALF_WIDTHS = tuple((end - start) % 360 / 2 for *_, (start, end) in COLOUR_FAMILIES)
_EN_WORDS = {en: index for index, (_, en, _, _) in enumerate(COLOUR_FAMILIES)}
_ZH_CHARS = {zh[0]: index for index, (_, _, zh, _) in enumerate(COLOUR_FAMILIES)}  # 红 橙 黄 绿 蓝 紫 粉
_EN_COLOUR = re.compile(r"\b(?:(an?) )?(" + "|".join(_EN_WORDS) + r")\b", re.IGNORECASE)  # with its article
# 粉红 (pink) before 红 (red); 粉 alone only beside a colour (粉色, 粉白相间, 蓝粉相间; 粉丝 are fans, 花粉 pollen)
_ZH_COLOUR = re.compile("粉红|粉(?=[色白黑灰红橙黄绿蓝紫相])|(?<=[白黑灰红橙黄绿蓝紫])粉|["
                        + "".join(c for c in _ZH_CHARS if c != "粉") + "]")
# Colour words no family word can stand for once turned (brown is a dark orange, cream a pale one; "reddish" has
# no renamed form here): a caption naming one is not recoloured, its image's copies keep their colours.
_EN_UNRENAMABLE = re.compile(
    r"\b(brown|brownish|tan|gold|golden|bronze|copper|teal|cyan|turquoise|aqua|crimson|maroon|scarlet|navy|"
    r"lavender|lilac|violet|magenta|amber|olive|lime|cream|creamy|beige|ivory|khaki|peach|reddish|bluish|blueish|"
    r"greenish|yellowish|pinkish|purplish|orangish|orangey|sandy|rosy|coral|blonde|cherry)\b", re.IGNORECASE)
_ZH_UNRENAMABLE = re.compile("棕|褐|金色|金黄|青色|青绿|橘|赤|奶油|米色|米黄|象牙|卡其|杏色")
TARGET_SPREAD = 0.5  # a turned body lands within this many of its target family's half-widths of the centre


@dataclass
class RecolourAugment:
    """``copies`` recoloured encodings of every training image, each turned to another colour family (distinct
    families per image, drawn with ``seed``); a training sample uses one with probability ``prob``, with the
    copy's renamed captions. An image that is not ``recolourable`` keeps its colours in its copies, and so does a
    copy whose turned body would not measure as the family it was turned to
    (``diffusion.colour_sentences.recoloured_copies``)."""

    copies: int = 0  # 0: off
    prob: float = 0.3
    seed: int = 0

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field (``engine.config.validate_config`` calls it)."""
        if not 0.0 <= self.prob <= 1.0:
            raise ConfigError(f"recolour.prob must be a probability in [0, 1], got {self.prob}")
        if not 0 <= self.copies < len(COLOUR_FAMILIES):
            raise ConfigError(f"recolour.copies must be in [0, {len(COLOUR_FAMILIES) - 1}] (each copy takes another "
                              f"of the {len(COLOUR_FAMILIES)} colour families), got {self.copies}")


def named_families(en: str, zh: str) -> set[int]:
    """The colour families the captions' colour words name."""
    return ({_EN_WORDS[m.group(2).lower()] for m in _EN_COLOUR.finditer(en)}
            | {_zh_family(m.group(0)) for m in _ZH_COLOUR.finditer(zh)})


def _zh_family(word: str) -> int:
    """The family of a ``_ZH_COLOUR`` match (粉红 is pink)."""
    return _ZH_CHARS[word[0]]


def recolourable(en: str, zh: str, body: int | None) -> bool:
    """Whether an image whose body is of family ``body`` (None: no dominant colour) can be recoloured with these
    captions: it has a body colour, every colour word can be renamed by a turn of the hue, and the captions name
    no neighbouring family of the body's ("a pink Chansey" whose body measures red, "with red cheeks" or not: which
    word names the body is unknown, so the renamed caption could contradict its colour sentence)."""
    if body is None or _EN_UNRENAMABLE.search(en) or _ZH_UNRENAMABLE.search(zh):
        return False
    neighbours = {(body - 1) % len(COLOUR_FAMILIES), (body + 1) % len(COLOUR_FAMILIES)}
    return not named_families(en, zh) & neighbours


def hue_family(hue: float) -> int:
    """The colour family whose range holds ``hue`` (degrees, any turn)."""
    return next(index for index in range(len(COLOUR_FAMILIES)) if in_hue_family(hue % 360, index))


def family_map(turn: float, body: int, body_hue: float) -> list[int]:
    """Where each colour family's words go when an image whose body (family ``body``) has hue ``body_hue`` is turned
    by ``turn`` degrees: the body's family goes where its measured hue lands, every other family where its centre
    lands (a detail's hue is not measured)."""
    return [hue_family((body_hue if family == body else FAMILY_CENTRES[family]) + turn)
            for family in range(len(COLOUR_FAMILIES))]


def rename_colours(en: str, zh: str, families: list[int]) -> tuple[str, str]:
    """The captions with every colour word of family ``f`` renamed to family ``families[f]`` (``family_map``), an
    English article before it made to fit. Captions that are not ``recolourable`` would keep some colour words
    wrong: the caller skips them."""
    def english(match: re.Match) -> str:
        article, old = match.groups()
        word = COLOUR_FAMILIES[families[_EN_WORDS[old.lower()]]][1]
        word = word.capitalize() if old[0].isupper() else word
        if article is None:
            return word
        new_article = "an" if word[0] in "aeiou" else "a"
        return f"{new_article.capitalize() if article[0].isupper() else new_article} {word}"

    def chinese(match: re.Match) -> str:
        return COLOUR_FAMILIES[families[_zh_family(match.group(0))]][2][0]

    return _EN_COLOUR.sub(english, en), _ZH_COLOUR.sub(chinese, zh)


def hue_turns(bodies: list[int | None], body_hues: list[float | None], can_recolour: list[bool], copies: int,
              seed: int) -> torch.Tensor:
    """``[copies, N]`` degrees: copy ``k`` of image ``i`` turns its body's hue ``body_hues[i]`` (family
    ``bodies[i]``) to another family, distinct per copy and drawn at random with ``seed``, landing at a random
    hue within ``TARGET_SPREAD`` × the family's half-width of its centre (real bodies vary within a family); 0
    (the image as it is) where the body has no dominant colour or ``can_recolour[i]`` is false
    (``recolourable``)."""
    g = torch.Generator().manual_seed(seed)
    turns = torch.zeros(copies, len(bodies))
    for i, (body, hue, ok) in enumerate(zip(bodies, body_hues, can_recolour)):
        # drawn for every image, so one image's eligibility does not shift the others' draws
        others = torch.randperm(len(COLOUR_FAMILIES) - 1, generator=g)[:copies]
        offsets = torch.rand(copies, generator=g) * 2 - 1
        if body is None or not ok:
            continue
        for k, (other, offset) in enumerate(zip(others.tolist(), offsets.tolist())):
            target = other + (other >= body)  # the families other than the body's
            turns[k, i] = FAMILY_CENTRES[target] + offset * TARGET_SPREAD * FAMILY_HALF_WIDTHS[target] - hue
    return turns


def recoloured_images(images: torch.Tensor, turns: torch.Tensor, device: torch.device | str = "cpu",
                      batch_size: int = 64) -> torch.Tensor:
    """uint8 ``[copies * N, 3, H, W]`` on the CPU: copy ``k`` of image ``i`` (row ``k * N + i``) is ``images[i]``
    with its hue turned by ``turns[k, i]`` (``hue_turns``), computed on ``device`` in batches."""
    if turns.ndim != 2 or turns.shape[1] != len(images):
        raise ValueError(f"turns must be [copies, {len(images)}], got {tuple(turns.shape)}")
    sources, flat = torch.arange(len(images)).repeat(len(turns)), turns.flatten()
    copies = [rotate_hue(images[sources[start:start + batch_size]].to(device), flat[start:start + batch_size]).cpu()
              for start in range(0, len(flat), batch_size)]
    return torch.cat(copies) if copies else images[:0].clone()

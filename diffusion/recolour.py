"""Recoloured training copies: a training image with its hue turned so its body takes another colour family, and
its captions with every colour word renamed by the same turn ("a red bird with yellow eyes" turned from red to
blue: "a blue bird with purple eyes").

The training set's bodies are unevenly coloured (of 750: 206 blue, 6 purple; docs/results/quality), so a colour
the set rarely draws can only be drawn near its few examples. A recoloured copy draws every body in every colour
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

RECOLOUR_VERSION = 1  # bump when the rules below change what a copy or its caption is

FAMILY_NAMES = tuple(name for name, *_ in COLOUR_FAMILIES)


def _centre(start: float, end: float) -> float:
    return (start + (end - start) % 360 / 2) % 360


# Each family's hue at the middle of its range: a body's measured hue is turned to its target family's centre.
FAMILY_CENTRES = tuple(_centre(*hue_range) for *_, hue_range in COLOUR_FAMILIES)
_EN_WORDS = {en: index for index, (_, en, _, _) in enumerate(COLOUR_FAMILIES)}
_ZH_CHARS = {zh[0]: index for index, (_, _, zh, _) in enumerate(COLOUR_FAMILIES)}  # 红 橙 黄 绿 蓝 紫 粉
_EN_COLOUR = re.compile(r"\b(?:(an?) )?(" + "|".join(_EN_WORDS) + r")\b", re.IGNORECASE)  # with its article
_ZH_COLOUR = re.compile("粉红|[" + "".join(_ZH_CHARS) + "]")  # 粉红 (pink) before 红 (red)
# Colour words no family word can stand for once turned (brown is a dark orange; "reddish" has no renamed form
# here): a caption naming one is not recoloured, its image's copies keep their colours.
_EN_UNRENAMABLE = re.compile(r"\b(brown|tan|gold|golden|bronze|copper|teal|cyan|turquoise|aqua|crimson|maroon|"
                             r"scarlet|navy|lavender|lilac|violet|magenta|amber|olive|lime|\w+ish)\b", re.IGNORECASE)
_ZH_UNRENAMABLE = re.compile("[棕褐金青橘赤]")


@dataclass
class RecolourAugment:
    """``copies`` recoloured encodings of every training image, each turned to another colour family (distinct
    families per image, drawn with ``seed``); a training sample uses one with probability ``prob``, with the
    copy's renamed captions. An image whose body has no dominant colour, or whose captions name a colour that
    cannot be renamed, keeps its colours in its copies."""

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


def renamable(en: str, zh: str) -> bool:
    """Whether every colour word of the captions can be renamed by a turn of the hue."""
    return not (_EN_UNRENAMABLE.search(en) or _ZH_UNRENAMABLE.search(zh))


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
    English article before it made to fit. Captions that are not ``renamable`` would keep some colour words wrong:
    the caller skips them."""
    def english(match: re.Match) -> str:
        article, old = match.groups()
        word = COLOUR_FAMILIES[families[_EN_WORDS[old.lower()]]][1]
        word = word.capitalize() if old[0].isupper() else word
        if article is None:
            return word
        new_article = "an" if word[0] in "aeiou" else "a"
        return f"{new_article.capitalize() if article[0].isupper() else new_article} {word}"

    def chinese(match: re.Match) -> str:
        return COLOUR_FAMILIES[families[_ZH_CHARS["粉" if match.group(0) == "粉红" else match.group(0)]]][2][0]

    return _EN_COLOUR.sub(english, en), _ZH_COLOUR.sub(chinese, zh)


def hue_turns(bodies: list[int | None], body_hues: list[float | None], can_rename: list[bool], copies: int,
              seed: int) -> torch.Tensor:
    """``[copies, N]`` degrees: copy ``k`` of image ``i`` turns its body's hue ``body_hues[i]`` (family
    ``bodies[i]``) to the centre of another family, distinct per copy and drawn at random with ``seed``; 0 (the
    image as it is) where the body has no dominant colour or a caption cannot be renamed."""
    g = torch.Generator().manual_seed(seed)
    turns = torch.zeros(copies, len(bodies))
    for i, (body, hue, ok) in enumerate(zip(bodies, body_hues, can_rename)):
        others = torch.randperm(len(COLOUR_FAMILIES) - 1, generator=g)[:copies]  # drawn for every image, so
        if body is None or not ok:  # one image's eligibility does not shift the others' draws
            continue
        for k, other in enumerate(others.tolist()):
            target = other + (other >= body)  # the families other than the body's
            turns[k, i] = FAMILY_CENTRES[target] - hue
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

"""Generation metrics: Fréchet distance, kernel distance, near-copies, seed diversity, and the composition and
colour measures that need no learned weights.

Features come from a fixed *judge* image encoder (the image tower of a CLIP stage trained apart from the run's
own, chosen once), so guidance cannot optimise the ruler and a swap study that changes the run's own CLIP stage
is still measured with the same ruler.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from data.augment import hsv_hue, to_float


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^1/2) of two feature sets [N, D] (float64).

    The matrix square root's trace is computed from the eigenvalues of S_r^1/2 S_f S_r^1/2 (symmetric,
    so ``eigvalsh`` is stable). With fewer samples than dimensions the covariances are rank-deficient and
    FD is biased upwards; compare runs at the same sample count only.
    """
    real, fake = real.double(), fake.double()
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = torch.cov(real.T), torch.cov(fake.T)
    evals, evecs = torch.linalg.eigh(cov_r)
    sqrt_r = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
    middle = torch.linalg.eigvalsh(sqrt_r @ cov_f @ sqrt_r).clamp_min(0).sqrt().sum()
    return float((mu_r - mu_f).square().sum() + cov_r.trace() + cov_f.trace() - 2 * middle)


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, gamma: float | None = None) -> float:
    """Unbiased squared MMD with the cubic polynomial kernel (gamma x.y + 1)^3 (the KID estimator), gamma 1 / d by
    default (KID's, for features of large norm such as Inception's). On unit-length features pass gamma = 1:
    at 1 / d the kernel is nearly linear there and the distance only compares the means."""
    real, fake = real.double(), fake.double()
    gamma = 1.0 / real.shape[1] if gamma is None else gamma
    k_rr = (gamma * real @ real.T + 1) ** 3
    k_ff = (gamma * fake @ fake.T + 1) ** 3
    k_rf = (gamma * real @ fake.T + 1) ** 3
    m, n = len(real), len(fake)
    return float((k_rr.sum() - k_rr.diag().sum()) / (m * (m - 1)) + (k_ff.sum() - k_ff.diag().sum()) / (n * (n - 1))
                 - 2 * k_rf.mean())


def thumbnails(images: torch.Tensor, size: int = 64) -> torch.Tensor:
    """[-1, 1] images -> flattened ``size`` x ``size`` thumbnails (area filter) for pixel-space distances."""
    return F.interpolate(images.float(), size=(size, size), mode="area").flatten(1)


def hue_blind_thumbnails(images: torch.Tensor, size: int = 64) -> torch.Tensor:
    """[-1, 1] images -> flattened ``size`` x ``size`` thumbnails of their HSV value and chroma (area filter), the
    hue left out: a training image with its hue turned (``data.augment.rotate_hue``, which keeps both) lies where
    the image does (up to uint8 rounding), so a recoloured copy can count as a copy."""
    _, value, chroma = hsv_hue(((images.float() + 1) / 2).clamp(0, 1))
    return F.interpolate(torch.stack([value, chroma], dim=1), size=(size, size), mode="area").flatten(1)


def silhouette_thumbnails(images: torch.Tensor, size: int = 64) -> torch.Tensor:
    """[-1, 1] images -> flattened ``size`` x ``size`` thumbnails of their foreground masks (``foreground_mask``,
    area filter): the body plan alone, blind to colour, fill and line. A training creature's outline redrawn in
    other colours and patterns (a butterfly's wings for a blue prompt) lies where that creature does."""
    return F.interpolate(foreground_mask(images)[:, None].float(), size=(size, size), mode="area").flatten(1)


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk: int = 256,
                      left_out: torch.Tensor | None = None) -> torch.Tensor:
    """Root-mean-square pixel distances ``[Q, k]`` from each query row to its ``k`` nearest rows of ``bank``,
    nearest first; ``left_out`` ``[Q, L]``: bank rows each query does not see."""
    best = []
    for start in range(0, len(queries), chunk):
        dist = torch.cdist(queries[start:start + chunk].double(), bank.double())
        if left_out is not None:
            dist.scatter_(1, left_out[start:start + chunk], torch.inf)
        best.append(dist.topk(min(k, len(bank)), dim=1, largest=False).values)
    return torch.cat(best) / queries.shape[1] ** 0.5


def seed_diversity(images: torch.Tensor, features: torch.Tensor, prompts: int, seeds: int) -> dict[str, float]:
    """Mean pairwise distance between images of one prompt made with different seeds.

    ``images``/``features`` are ordered prompt-major (``prompts`` blocks of ``seeds``). Reports pixel RMS
    distance at 64 px and judge-feature cosine distance; 0 would mean the seed does not matter.
    """
    thumbs = thumbnails(images).view(prompts, seeds, -1)
    feats = F.normalize(features.float(), dim=-1).view(prompts, seeds, -1)
    mask = ~torch.eye(seeds, dtype=torch.bool)
    pixel = torch.cdist(thumbs.double(), thumbs.double())[:, mask] / thumbs.shape[-1] ** 0.5
    cosine = 1 - (feats @ feats.transpose(1, 2))[:, mask]
    return {"diversity_pixel": float(pixel.mean()), "diversity_feature": float(cosine.mean())}


# --- Composition and colour: measured on pixels, without learned weights -----------------------------------
# A pixel is background when every channel is at least this bright (JPEG-noisy white pages stay background).
WHITE_LEVEL = 0.9  # in [0, 1] units
BORDER_WIDTH = 1 / 64  # the outer ring whose foreground share is the border occupancy
FRAME_FILLING_BORDER = 0.25  # a sample whose ring is more foreground than this fills the frame
PART_MIN_AREA = 0.01  # connected foreground regions smaller than this share of the image are specks
MEASURE_SIZE = 128  # composition is measured on area-downsampled copies of this side


def unit_pixels(images: torch.Tensor, size: int = MEASURE_SIZE) -> torch.Tensor:
    """[-1, 1] images as float [0, 1] pixels at ``size`` x ``size`` (area filter), the measures' common input."""
    if images.shape[-1] != size:
        images = F.interpolate(images.float(), size=(size, size), mode="area")
    return (images.float() + 1) / 2


def shrunk(images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Images (uint8, or [-1, 1] float) as [-1, 1] at ``MEASURE_SIZE``, the size every pixel measure and picture
    works at (area filter), a batch at a time: full-size float copies of a whole set (gigabytes at 512 px) never
    pile up."""
    return torch.cat([unit_pixels(to_float(chunk) if chunk.dtype == torch.uint8 else chunk) * 2 - 1
                      for chunk in images.split(batch_size)])


def foreground_mask(images: torch.Tensor, size: int = MEASURE_SIZE) -> torch.Tensor:
    """Bool ``[B, size, size]``: pixels of [-1, 1] images that are not near-white."""
    return unit_pixels(images, size).amin(dim=1) < WHITE_LEVEL


def region_sizes(mask: torch.Tensor) -> list[list[int]]:
    """Pixel counts of the 8-connected regions of each bool mask ``[B, H, W]`` (a flood fill per region)."""
    b, h, w = mask.shape
    neighbours = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    sizes = []
    for image in mask.cpu().tolist():
        seen = [[False] * w for _ in range(h)]
        found = []
        for y0 in range(h):
            for x0 in range(w):
                if not image[y0][x0] or seen[y0][x0]:
                    continue
                seen[y0][x0] = True
                stack, count = [(y0, x0)], 0
                while stack:
                    y, x = stack.pop()
                    count += 1
                    for dy, dx in neighbours:
                        ny, nx = y + dy, x + dx
                        if 0 <= ny < h and 0 <= nx < w and image[ny][nx] and not seen[ny][nx]:
                            seen[ny][nx] = True
                            stack.append((ny, nx))
                found.append(count)
        sizes.append(found)
    return sizes


def count_parts(mask: torch.Tensor, min_area: float = PART_MIN_AREA) -> torch.Tensor:
    """Number of connected foreground regions covering at least ``min_area`` of the image, per image ``[B]``."""
    least = min_area * mask.shape[-1] * mask.shape[-2]
    return torch.tensor([sum(size >= least for size in sizes) for sizes in region_sizes(mask)])


def composition_per_image(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each image's foreground share, border occupancy, whether it fills the frame, its foreground parts, and the
    share of its foreground with a reliable hue (``pixel_hues``): low where a picture is pale or grey, whatever its
    hue; 0 for a blank page."""
    _, chromatic, mask = pixel_hues(images)  # its foreground is foreground_mask's: one resize serves both
    size = mask.shape[-1]
    ring = torch.ones(size, size, dtype=torch.bool)
    width = max(1, round(size * BORDER_WIDTH))
    ring[width:-width, width:-width] = False
    border = mask[:, ring].float().mean(dim=1)
    return {"fg_share": mask.flatten(1).float().mean(dim=1), "border_fg": border,
            "frame_filling": border > FRAME_FILLING_BORDER, "parts": count_parts(mask),
            "chromatic_share": chromatic.flatten(1).float().sum(1) / mask.flatten(1).float().sum(1).clamp_min(1)}


def composition_records(each: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """``composition_per_image``'s figures as one record per sample (the part of a sample record, with its copy
    and colour flags, that paired comparisons read): parts, foreground share and chromatic share (4 decimals),
    frame filling."""
    return [{"parts": int(parts), "fg_share": round(float(fg), 4), "chromatic_share": round(float(chromatic), 4),
             "frame_filling": bool(filling)}
            for parts, fg, chromatic, filling in zip(each["parts"], each["fg_share"], each["chromatic_share"],
                                                     each["frame_filling"], strict=True)]


def composition(images: torch.Tensor) -> dict[str, float]:
    """Foreground share, border occupancy, share of frame-filling images, foreground parts per image and the
    foreground's chromatic share."""
    return composition_means(composition_per_image(images))


def composition_means(each: dict[str, torch.Tensor]) -> dict[str, float]:
    """``composition`` from the images' ``composition_per_image``."""
    return {"fg_share": float(each["fg_share"].mean()), "border_fg": float(each["border_fg"].mean()),
            "frame_filling_share": float(each["frame_filling"].float().mean()),
            "parts_mean": float(each["parts"].float().mean()),
            "chromatic_share": float(each["chromatic_share"].mean())}


def sharpness(images: torch.Tensor, size: int = MEASURE_SIZE) -> float:
    """Mean absolute Laplacian of the luminance ([0, 1] units) at ``size`` px: edge contrast, which a blurry
    decoder or an under-trained UNet lowers. Compare with the real images' value at the same size."""
    luma = unit_pixels(images, size).mean(dim=1, keepdim=True)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    return float(F.conv2d(luma, kernel.to(luma)).abs().mean())


# Hue families of chromatic pixels: (name, English word, Chinese word, hue range in degrees [from, to)).
COLOUR_FAMILIES = (
    ("red", "red", "红色", (345.0, 15.0)),
    ("orange", "orange", "橙色", (15.0, 40.0)),
    ("yellow", "yellow", "黄色", (40.0, 70.0)),
    ("green", "green", "绿色", (70.0, 165.0)),
    ("blue", "blue", "蓝色", (165.0, 255.0)),
    ("purple", "purple", "紫色", (255.0, 290.0)),
    ("pink", "pink", "粉色", (290.0, 345.0)),
)
FAMILY_NAMES = tuple(name for name, *_ in COLOUR_FAMILIES)
PROMPT_COLOURS = ("red", "blue", "green", "yellow", "purple", "pink")  # the colours the adherence prompts name
CHROMA_MIN = 0.2  # max - min channel in [0, 1]: below it a pixel is grey/black/white and has no hue
VALUE_MIN = 0.25  # darker pixels (outlines, shadows) have no reliable hue
# A hue family under this share of the foreground's pixels is a trace (a speck, an eye, a rim of colour), not one
# of the picture's dominant hues: a grey body with a red eye is not a red creature.
DOMINANT_SHARE = 0.05


def colour_prompts(seeds: int) -> tuple[list[str], list[int], list[str]]:
    """(prompts, seeds, named colour) for every prompt colour in English and Chinese, ``seeds`` seeds each."""
    words = {name: (en, zh) for name, en, zh, _ in COLOUR_FAMILIES}
    prompts, seed_list, named = [], [], []
    for colour in PROMPT_COLOURS:
        en, zh = words[colour]
        for text in (f"a {en} pokemon", f"一只{zh}的宝可梦"):
            for seed in range(seeds):
                prompts.append(text)
                seed_list.append(seed)
                named.append(colour)
    return prompts, seed_list, named


def pixel_hues(images: torch.Tensor, size: int = MEASURE_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``([B, size, size] ×3)``: each pixel's HSV hue in degrees [0, 360), whether it has a reliable hue (chromatic,
    not dark, not near-white), and whether it is foreground (not near-white, chromatic or not)."""
    rgb = unit_pixels(images, size).clamp(0, 1)
    hue, top, chroma = hsv_hue(rgb)
    bottom = rgb.amin(dim=1)
    chromatic = (chroma >= CHROMA_MIN) & (top >= VALUE_MIN) & (bottom < WHITE_LEVEL)
    return hue, chromatic, bottom < WHITE_LEVEL


def in_hue_family(hue: torch.Tensor | float, family: int) -> torch.Tensor | bool:
    """Bool, elementwise: the hue (degrees in [0, 360)) lies in ``COLOUR_FAMILIES[family]``'s range."""
    start, end = COLOUR_FAMILIES[family][3]
    return (hue >= start) & (hue < end) if start < end else (hue >= start) | (hue < end)


def hue_family_counts(images: torch.Tensor, size: int = MEASURE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, len(COLOUR_FAMILIES)], [B])``: each image's chromatic foreground pixels in each hue family, and its
    foreground pixels (those not near-white, chromatic or not)."""
    hue, chromatic, foreground = pixel_hues(images, size)
    counts = [(in_hue_family(hue, family) & chromatic).flatten(1).float().sum(1)
              for family in range(len(COLOUR_FAMILIES))]
    return torch.stack(counts, dim=1), foreground.flatten(1).float().sum(1)


def hue_family_shares(images: torch.Tensor, size: int = MEASURE_SIZE) -> torch.Tensor:
    """``[B, len(COLOUR_FAMILIES)]``: share of each image's chromatic foreground pixels in each hue family."""
    counts, _ = hue_family_counts(images, size)
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1)


def colour_hits(images: torch.Tensor, named: list[str], top: int = 2) -> torch.Tensor:
    """Bool ``[B]``: the named colour family is one of the image's dominant hues: among the ``top`` most common
    hue families, and covering at least ``DOMINANT_SHARE`` of the foreground."""
    return colour_hits_from_counts(*hue_family_counts(images), named, top)


def colour_hits_from_counts(counts: torch.Tensor, foreground: torch.Tensor, named: list[str], top: int = 2
                            ) -> torch.Tensor:
    """``colour_hits`` from the images' ``hue_family_counts``."""
    ranked = counts.argsort(dim=1, descending=True)[:, :top]
    wanted = torch.tensor([FAMILY_NAMES.index(n) for n in named])
    named_pixels = counts.gather(1, wanted[:, None]).squeeze(1)
    dominant = (named_pixels > 0) & (named_pixels >= DOMINANT_SHARE * foreground)
    return (ranked == wanted[:, None]).any(dim=1) & dominant


def first_named_colours(captions: Sequence[str]) -> list[tuple[int, str]]:
    """``(index, colour)`` of every caption that names a prompt colour, with the colour it names first: the real
    images' colour adherence is judged on these."""
    return [(i, names[0]) for i, names in enumerate(map(colours_named, captions)) if names]


def share_by_colour(flags: torch.Tensor, named: list[str]) -> dict[str, float]:
    """Share of ``flags`` (one per sample: a colour hit, a near-copy) per named colour, for the colours ``named``
    holds: which colours a model gets wrong, or copies for."""
    return {colour: float(flags[[i for i, n in enumerate(named) if n == colour]].float().mean())
            for colour in dict.fromkeys(named)}


def at_prompt_mix(by_colour: dict[str, float], named: Sequence[str]) -> float | None:
    """A per-colour share (``share_by_colour``'s) averaged as ``named`` (one colour per sample) mixes the colours:
    the real images' colour adherence as the colour prompts ask for it (six colours alike), where the captions'
    own mix leans on the colours the ruler reads well. None when a named colour has no share, or none is named."""
    if not named or any(colour not in by_colour for colour in named):
        return None
    return sum(by_colour[colour] for colour in named) / len(named)


def colours_named(caption: str) -> list[str]:
    """The prompt colours a caption names, English or Chinese, in the order it names them (for the real images'
    adherence, whose named colour is the first: "a blue pokemon with red eyes" is a blue one)."""
    lowered, found = caption.lower(), []
    for name, en, zh, _ in COLOUR_FAMILIES:
        if name not in PROMPT_COLOURS:
            continue
        english = re.search(rf"\b{en}\b", lowered)
        # 粉红色 is pink (粉色 too), not red
        chinese = re.search("粉红?色" if zh[0] == "粉" else rf"(?<!粉){zh[0]}色", caption)
        positions = [p for p in (english.start() if english else -1, chinese.start() if chinese else -1) if p >= 0]
        if positions:
            found.append((min(positions), name))
    return [name for _, name in sorted(found)]


# Neighbours of the relative near-copy rule: enough that a training image's mirror and a few look-alikes do not
# decide the mean distance.
COPY_NEIGHBOURS = 50
# A near-copy lies nearer the training set than this share of the unseen (validation) images do.
COPY_QUANTILE = 0.05


def near_copies(sample_features: torch.Tensor, train_features: torch.Tensor, val_features: torch.Tensor,
                cosine: bool = False, relative_to: int = 0, left_out: torch.Tensor | None = None) -> dict[str, Any]:
    """Share of samples closer to their nearest training item than 95 % of validation images are to theirs
    (``share``; ``copied``, a bool per sample, says which; ``distance``, each sample's to its nearest).

    Features are pixel thumbnails (RMS distance) or judge embeddings (``cosine``: 1 - cosine similarity). Put
    the training images' mirrors in ``train_features``: a mirrored copy is still a copy. ``left_out`` ``[S, L]``:
    training rows each sample does not see (``held_out_copies``). Unseen real images score about 5 %, though not
    exactly: the threshold is a quantile of a few validation images' distances, so ``held_out_copies`` measures
    what they score.

    ``relative_to = k`` (pixels only) adds ``share_relative``, the same rule on each nearest distance divided by
    the mean distance to the ``k`` nearest (Carlini et al. 2023's extraction rule), from the same distances: a
    copy lies far closer to one training image than to the others, whereas a blend of drawings lies about as
    close to several, and the absolute rule counts it too. Neither rule tells a copy from a very pale picture (a
    blank page, a washed-out drawing): one pale training image lies far closer to it than the rest, so both
    count it.
    """
    def copied(sample_d: torch.Tensor, val_d: torch.Tensor) -> torch.Tensor:
        return sample_d < copy_cutoff(val_d)

    if cosine:
        if relative_to:
            raise ValueError("relative_to applies to pixel distances only")
        sample_k = cosine_nearest(sample_features, train_features, left_out)[0][:, None]
        val_k = cosine_nearest(val_features, train_features)[0][:, None]
    else:
        sample_k = nearest_distances(sample_features, train_features, max(1, relative_to), left_out=left_out)
        val_k = nearest_distances(val_features, train_features, max(1, relative_to))
    flags = copied(sample_k[:, 0], val_k[:, 0])
    out = {"share": float(flags.double().mean()), "copied": flags, "distance": sample_k[:, 0],
           "sample_nn": float(sample_k[:, 0].mean()), "val_nn": float(val_k[:, 0].mean())}
    if relative_to:
        ratio = lambda d: d[:, 0] / d.mean(dim=1).clamp_min(1e-12)  # noqa: E731
        out["share_relative"] = float(copied(ratio(sample_k), ratio(val_k)).double().mean())
    return out


def held_out_copies(bank: torch.Tensor, val_features: torch.Tensor, cosine: bool = False,
                    relative_to: int = 0) -> dict[str, Any]:
    """``near_copies`` of the training images themselves, each measured against the rest of the training set, its
    own row and its mirror's left out: what unseen real images score under the rule with these validation images
    (the real images' value of a near-copy share). ``bank``: the training features, then their mirrors', in the
    same order (as ``near_copies`` takes them)."""
    if len(bank) % 2:
        raise ValueError(f"bank has {len(bank)} rows: expected the training features, then as many mirrors")
    items = torch.arange(len(bank) // 2)
    return near_copies(bank[:len(items)], bank, val_features, cosine=cosine, relative_to=relative_to,
                       left_out=torch.stack([items, items + len(items)], dim=1))


def copy_cutoff(val_distances: torch.Tensor) -> torch.Tensor:
    """The near-copy rule's cutoff: the ``COPY_QUANTILE`` quantile of the validation images' distances (nearest
    distances, or their ratios under the relative rule)."""
    return torch.quantile(val_distances, COPY_QUANTILE)


def copy_threshold(bank: torch.Tensor, val_features: torch.Tensor) -> float:
    """The RMS distance under which ``near_copies`` (absolute rule) calls a sample a copy of a ``bank`` row."""
    return float(copy_cutoff(nearest_distances(val_features, bank)[:, 0]))


def twin_groups(outlines: torch.Tensor, threshold: float) -> list[list[int]]:
    """Groups of training images (rows of ``outlines``: the images' silhouette thumbnails, then their mirrors') whose
    silhouettes, or their mirrors', lie within ``threshold`` of each other, chained; largest first, single images
    left out: the body plans the training set repeats."""
    if len(outlines) % 2:
        raise ValueError(f"outlines has {len(outlines)} rows: expected the images' silhouettes, then as many mirrors'")
    count = len(outlines) // 2
    near = torch.cdist(outlines[:count].double(), outlines.double()) / outlines.shape[1] ** 0.5 < threshold
    near = near[:, :count] | near[:, count:]
    near = (near | near.T).fill_diagonal_(False)  # a twin either way round
    groups, seen = [], set()
    for first in range(count):
        if first in seen:
            continue
        group, stack = [], [first]
        while stack:
            row = stack.pop()
            if row not in seen:
                seen.add(row)
                group.append(row)
                stack += near[row].nonzero().flatten().tolist()
        if len(group) > 1:
            groups.append(sorted(group))
    return sorted(groups, key=len, reverse=True)


def twin_weights(groups: Sequence[Sequence[int]], count: int) -> torch.Tensor:
    """Float64 ``[count]`` draw weights of ``count`` images: 1 / (group size) for each member of a ``twin_groups``
    group, 1 elsewhere, so a body plan the set repeats weighs as much as one image."""
    weights = torch.ones(count, dtype=torch.float64)
    for group in groups:
        weights[list(group)] = 1 / len(group)
    return weights


def cosine_nearest(queries: torch.Tensor, bank: torch.Tensor,
                   left_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query row's cosine distance (1 - cosine similarity, float64) to its nearest bank row, and that row;
    ``left_out`` ``[Q, L]``: bank rows each query does not see."""
    similarity = F.normalize(queries.double(), dim=-1) @ F.normalize(bank.double(), dim=-1).T
    if left_out is not None:
        similarity.scatter_(1, left_out, -torch.inf)
    similarity, index = similarity.max(dim=1)
    return 1 - similarity, index


def nearest_indices(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Index of each query row's nearest bank row (Euclidean)."""
    return torch.cdist(queries.double(), bank.double()).argmin(dim=1)

"""What the UNet trains on, computed once: VAE posterior moments and frozen CLIP text states.

The VAE and the text encoder are frozen during UNet training, so running them every step would only burn
time. Each training image and its horizontal mirror is encoded once to its posterior ``N(mean, exp(logvar))``,
and so are ``K`` geometrically augmented copies of each (``data.augment.apply_geometry``, in pixel space,
before the VAE), with their augmentation labels. The cache is saved to disk, keyed by the VAE and data
fingerprints and the augmentation settings, so a resumed or repeated run skips the encoding; each step draws
a fresh latent from it. Every caption, English and Chinese, a few clause-dropped variants of each, and the
empty prompt are encoded once; each step picks a variant and a language per sample and drops captions for
classifier-free guidance.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from data import language_mask
from data.augment import AUGMENT_DIM, apply_geometry, float_batches, random_geometry, to_float
from data.captions import clause_variants
from engine.config import ConfigError
from engine.precision import inference_autocast
from engine.stage import atomic_write


LATENT_NORMALISATIONS = ("global", "per_channel")


@dataclass(frozen=True)
class LatentNormalisation:
    """The map between the VAE's raw latents and the UNet's: ``(raw - shift) * scale``, per channel where the
    tuples have one entry per channel, else one factor for all.

    "global" is the LDM recipe: one factor, the VAE's ``scaling_factor``, gives every latent unit variance
    together, and each channel keeps its own mean and spread. "per_channel" (EDM2's) shifts each channel to zero
    mean and scales it to unit variance (the VAE's ``latents_mean`` / ``latents_std``), so every channel meets
    the diffusion's unit noise at the same signal-to-noise ratio.
    """

    scale: tuple[float, ...]
    shift: tuple[float, ...] | None = None

    @classmethod
    def of_vae(cls, vae_config: Any, mode: str = "global", where: str = "the VAE stage") -> "LatentNormalisation":
        """The normalisation ``mode`` (one of ``LATENT_NORMALISATIONS``) from a VAE config's measured moments;
        a ``ValueError`` saying what ``where`` (the VAE, for the message) lacks for it; the caller adds the fix."""
        if mode not in LATENT_NORMALISATIONS:
            raise ValueError(f"unknown latent normalisation {mode!r}; choose one of {list(LATENT_NORMALISATIONS)}")
        if vae_config.scaling_factor is None:
            raise ValueError(f"{where} has no scaling_factor (measured at the end of VAE training)")
        if mode == "global":
            return cls((float(vae_config.scaling_factor),))
        if vae_config.latents_mean is None or vae_config.latents_std is None:
            raise ValueError(f"{where} has no per-channel latent moments (latents_mean / latents_std, which VAE "
                             "training records at its end since the per-channel normalisation exists)")
        if not min(vae_config.latents_std) > 0:
            raise ValueError(f"{where} has a latent channel without spread (latents_std "
                             f"{list(vae_config.latents_std)}), which cannot be scaled to unit variance")
        return cls(tuple(1.0 / std for std in vae_config.latents_std), tuple(vae_config.latents_mean))

    def _per_channel(self, values: tuple[float, ...], like: Tensor) -> float | Tensor:
        if len(values) == 1:  # a Python float multiplies as the LDM recipe always has, bit for bit
            return values[0]
        if len(values) != like.shape[1]:
            raise ValueError(f"a {len(values)}-channel latent normalisation met {like.shape[1]}-channel latents")
        return _channel_constants(values, like.device, like.dtype)

    def normalise(self, raw: Tensor) -> Tensor:
        """The UNet's latents ``[B, C, h, w]`` of raw VAE latents."""
        if self.shift is not None:
            raw = raw - self._per_channel(self.shift, raw)
        return raw * self._per_channel(self.scale, raw)

    def denormalise(self, latents: Tensor) -> Tensor:
        """Raw VAE latents (what its decoder takes) of the UNet's latents."""
        raw = latents / self._per_channel(self.scale, latents)
        return raw if self.shift is None else raw + self._per_channel(self.shift, latents)


@functools.lru_cache(maxsize=32)
def _channel_constants(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """``values`` as a ``[C, 1, 1]`` tensor, made once per device and dtype: a host-to-GPU copy per training step
    would wait for the GPU to drain."""
    return torch.tensor(values, dtype=dtype).to(device)[:, None, None]


def cache_key(*fingerprints: str) -> str:
    """A short file-name-safe key for the combination of the given fingerprints."""
    return hashlib.sha256("|".join(fingerprints).encode()).hexdigest()[:16]


@torch.no_grad()
def encode_moments(vae: torch.nn.Module, batches: Iterable[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """Posterior mean and log-variance ``[N, C, h, w]`` (float32, on ``device``) of [-1, 1] image batches."""
    means, logvars = [], []
    for images in batches:
        with inference_autocast(device):
            posterior = vae.encode(images)
        means.append(posterior.mean.float())
        logvars.append(posterior.logvar.float())
    return torch.cat(means), torch.cat(logvars)


@dataclass
class LatentCache:
    """Posterior moments of ``N`` images, their mirrors, then ``K`` augmented copies of each image.

    Row ``i + m * N`` has source image ``i``: ``m = 0`` is the image, ``m = 1`` its mirror (absent when built
    without mirrors), each following block of ``N`` one augmented copy of every image. ``mean`` and ``logvar``
    are ``[R, C, h, w]``; ``labels [R, AUGMENT_DIM]`` are the augmentation labels (zero for the plain rows,
    ``None`` when no copy is augmented). Samples are the UNet's latents: raw ones through ``normalisation``
    (the cache file holds the raw moments, whatever the normalisation).
    """

    mean: Tensor
    logvar: Tensor
    num_images: int
    normalisation: LatentNormalisation
    labels: Tensor | None = None
    num_plain_rows: int | None = None  # the un-augmented rows (images and mirrors) come first

    def __post_init__(self) -> None:
        if self.num_plain_rows is None:
            self.num_plain_rows = self.mean.shape[0]

    def __len__(self) -> int:
        return self.mean.shape[0]

    @property
    def num_augmented_copies(self) -> int:
        return (len(self) - self.num_plain_rows) // self.num_images

    def augmented_rows(self, rows: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """For each row, a random one of its source image's augmented copies."""
        copy = torch.randint(0, self.num_augmented_copies, rows.shape, device=rows.device, generator=generator)
        return self.num_plain_rows + copy * self.num_images + rows % self.num_images

    def image_ids(self, rows: Tensor) -> Tensor:
        """The source image of each row (a mirror maps to its original)."""
        return rows % self.num_images

    def sample(self, rows: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The UNet's latents ``normalise(mean + exp(logvar / 2) * noise)`` of ``rows``."""
        mean, logvar = self.mean[rows], self.logvar[rows]
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.normalisation.normalise(mean + torch.exp(0.5 * logvar) * noise)

    def normalised_mean(self, rows: Tensor | None = None) -> Tensor:
        """The UNet's latents of the posterior means of ``rows`` (default: every row; the deterministic latents
        used for validation)."""
        return self.normalisation.normalise(self.mean if rows is None else self.mean[rows])

    def save(self, path: str | Path) -> None:
        tensors = {"mean": self.mean.cpu().contiguous(), "logvar": self.logvar.cpu().contiguous()}
        if self.labels is not None:
            tensors["labels"] = self.labels.cpu().contiguous()
        metadata = {"num_images": str(self.num_images), "num_plain_rows": str(self.num_plain_rows)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | Path, normalisation: LatentNormalisation,
             device: str | torch.device = "cpu") -> "LatentCache":
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata()
        tensors = load_file(str(path), device=str(device))
        plain = metadata.get("num_plain_rows")
        return cls(tensors["mean"], tensors["logvar"], int(metadata["num_images"]), normalisation,
                   tensors.get("labels"), int(plain) if plain is not None else None)


AUGMENT_VERSION = 1  # bump when data.augment's transform or label layout changes, so stale caches are not reused


@dataclass
class GeometryAugment:
    """Ranges of the pixel-space augmentation baked into the latent cache (see ``data.augment.random_geometry``).

    ``copies`` augmented encodings are made of every training image (each mirrored at random, which needs no
    label: a mirrored creature is still a creature); a training sample uses one with probability ``prob``.
    Shrinking more than enlarging keeps most copies whole creatures on white, like the data.
    """

    copies: int = 0  # 0: off; docs/results/quality measured 8 (with prob 0.5) against none
    prob: float = 0.5
    log2_scale: tuple[float, float] = (-0.7, 0.2)  # x0.62 .. x1.15
    shift: float = 0.2  # up to 10 % of the side
    rotation_deg: float = 20.0
    log2_aspect: float = 0.25  # x0.84 .. x1.19 across the two axes
    seed: int = 0  # the copies are a fixed function of the data and this seed

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field (``engine.config.validate_config`` calls it)."""
        if not 0.0 <= self.prob <= 1.0 or self.copies < 0:
            raise ConfigError(f"augment.prob must be in [0, 1] and augment.copies >= 0, got {self.prob} and "
                              f"{self.copies}")

    def key(self) -> str:
        """A string that changes when any setting that shapes the cached copies changes (not ``prob``), or the
        code that makes them (``AUGMENT_VERSION``)."""
        return f"v{AUGMENT_VERSION}:" + repr({k: v for k, v in asdict(self).items() if k != "prob"})


def build_latent_cache(vae: torch.nn.Module, images_uint8: Tensor, path: str | Path, batch_size: int,
                       device: torch.device, normalisation: LatentNormalisation, mirror: bool = True,
                       augment: GeometryAugment | None = None) -> LatentCache:
    """Load the cache at ``path`` or encode ``images_uint8`` (their mirrors, their augmented copies) and save it."""
    path = Path(path)
    if path.is_file():
        return LatentCache.load(path, normalisation, device)
    num_images = len(images_uint8)
    with_mirrors = torch.cat([images_uint8, images_uint8.flip(-1)]) if mirror or augment is not None else None
    plain = with_mirrors if mirror else images_uint8
    mean, logvar = encode_moments(vae, float_batches(plain, batch_size, device), device)
    labels = None
    if augment is not None and augment.copies > 0:
        g = torch.Generator().manual_seed(augment.seed)
        count = augment.copies * num_images
        aug_labels = random_geometry(count, augment.log2_scale, augment.shift, augment.rotation_deg,
                                     augment.log2_aspect, generator=g)
        flips = torch.rand(count, generator=g) < 0.5

        def augmented_batches() -> Iterator[Tensor]:  # copy k of image i is row k * N + i
            for start in range(0, count, batch_size):
                index = torch.arange(start, min(start + batch_size, count))
                source = index % num_images + num_images * flips[index].long()  # the image or its mirror
                images = to_float(with_mirrors[source].to(device))
                yield apply_geometry(images, aug_labels[index].to(device))

        aug_mean, aug_logvar = encode_moments(vae, augmented_batches(), device)
        labels = torch.cat([torch.zeros(len(mean), AUGMENT_DIM), aug_labels]).to(device)
        mean, logvar = torch.cat([mean, aug_mean]), torch.cat([logvar, aug_logvar])
    cache = LatentCache(mean, logvar, num_images, normalisation, labels, num_plain_rows=len(plain))
    cache.save(path)
    return cache


@torch.no_grad()
def encode_prompts(clip: torch.nn.Module, prompts: list[str], batch_size: int = 256) -> Tensor:
    """Text states ``[len(prompts), L, D]`` in batches (the text encoder is frozen)."""
    return torch.cat([clip.text_states(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)])


@dataclass
class TextStateCache:
    """Text states of every caption in both languages, ``[N, V, L, D]`` each (``V`` variants per caption: the
    full caption first, then clause-dropped ones, see ``data.captions.clause_variants``), and of the empty
    prompt ``[L, D]``."""

    en: Tensor
    zh: Tensor
    null: Tensor

    @classmethod
    def build(cls, clip: torch.nn.Module, en: list[str], zh: list[str], variants: int = 0,
              clause_keep_prob: float = 0.6, seed: int = 0,
              keep_last: Callable[[str], bool] | None = None) -> "TextStateCache":
        """Encode ``en`` and ``zh`` with ``variants`` clause-dropped variants each; a caption for which
        ``keep_last`` (when given) holds keeps its last clause in all of them."""
        if len(en) != len(zh):
            raise ValueError(f"got {len(en)} English but {len(zh)} Chinese captions; give one of each per image")
        g = torch.Generator().manual_seed(seed)

        def states(captions: list[str]) -> Tensor:
            texts = [t for c in captions
                     for t in [c, *clause_variants(c, variants, clause_keep_prob, g, bool(keep_last and keep_last(c)))]]
            encoded = encode_prompts(clip, texts)
            return encoded.view(len(captions), variants + 1, *encoded.shape[1:])

        return cls(states(en), states(zh), encode_prompts(clip, [""])[0])

    def contexts(self, image_ids: Tensor, zh_prob: float, drop_prob: float,
                 generator: torch.Generator | None = None) -> Tensor:
        """One caption's states per sample: a random variant, Chinese with ``zh_prob``, then the null state
        with ``drop_prob``."""
        use_zh = language_mask(len(image_ids), zh_prob, generator, device=image_ids.device)
        drop = torch.rand(len(image_ids), device=image_ids.device, generator=generator) < drop_prob
        variant = torch.randint(0, self.en.shape[1], image_ids.shape, device=image_ids.device, generator=generator)
        states = torch.where(use_zh[:, None, None], self.zh[image_ids, variant], self.en[image_ids, variant])
        return torch.where(drop[:, None, None], self.null, states)

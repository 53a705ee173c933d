"""Generation metrics: Fréchet distance, kernel distance, nearest-neighbour memorisation, seed diversity.

Features come from a fixed *judge* image encoder (the image tower of a CLIP stage chosen once), so a
swap study that changes the run's own CLIP stage is still measured with the same ruler.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def kernel_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Unbiased squared MMD with the cubic polynomial kernel (x.y / d + 1)^3 (the KID estimator)."""
    real, fake = real.double(), fake.double()
    d = real.shape[1]
    k_rr = (real @ real.T / d + 1) ** 3
    k_ff = (fake @ fake.T / d + 1) ** 3
    k_rf = (real @ fake.T / d + 1) ** 3
    m, n = len(real), len(fake)
    return float((k_rr.sum() - k_rr.diag().sum()) / (m * (m - 1)) + (k_ff.sum() - k_ff.diag().sum()) / (n * (n - 1))
                 - 2 * k_rf.mean())


def thumbnails(images: torch.Tensor, size: int = 64) -> torch.Tensor:
    """[-1, 1] images -> flattened ``size`` x ``size`` thumbnails (area filter) for pixel-space distances."""
    return F.interpolate(images.float(), size=(size, size), mode="area").flatten(1)


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Root-mean-square pixel distance from each query row to its nearest row of ``bank``."""
    best = []
    for start in range(0, len(queries), chunk):
        dist = torch.cdist(queries[start:start + chunk].double(), bank.double())
        best.append(dist.min(dim=1).values)
    return torch.cat(best) / queries.shape[1] ** 0.5


def memorisation(samples: torch.Tensor, train: torch.Tensor, val: torch.Tensor) -> dict[str, float]:
    """How close samples come to training images, against how close held-out real images come.

    A sample is a *near-copy* when it is closer to its nearest training image than 95 % of real
    validation images are to theirs (all at 64 x 64 px): real unseen images give about 5 % by this rule.
    """
    sample_nn = nearest_distance(thumbnails(samples), thumbnails(train))
    val_nn = nearest_distance(thumbnails(val), thumbnails(train))
    threshold = torch.quantile(val_nn, 0.05)
    return {
        "nn_dist_samples": float(sample_nn.mean()),
        "nn_dist_real_val": float(val_nn.mean()),
        "near_copy_share": float((sample_nn < threshold).double().mean()),
    }


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

"""Noise sources for sampling: where the starting noise and a stochastic sampler's step noise come from.

A ``NoiseSource`` is called with the current ``x [B, ...]`` and returns standard normal noise of its shape,
dtype and device. ``PerSampleNoise`` keeps one generator per sample (as EDM2's stacked per-sample generators
and k-diffusion's ``noise_sampler`` do), so a sample's every draw depends on its own seed only: seed 4
gives the same image alone and inside any batch, with every sampler.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

NoiseSource = Callable[[Tensor], Tensor]


class PerSampleNoise:
    """Row ``i`` of every draw comes from a CPU generator seeded with ``seeds[i]`` (CPU draws are the same
    on every machine); the first draw is the starting noise, the later ones a sampler's step noise."""

    def __init__(self, seeds: Sequence[int]) -> None:
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]

    def initial(self, shape: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
        """The starting noise, ``[len(seeds), *shape]`` in float32."""
        return self._draw(tuple(shape), torch.float32, torch.device(device))

    def __call__(self, like: Tensor) -> Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(f"noise for a batch of {like.shape[0]} asked of {len(self.generators)} per-sample seeds")
        return self._draw(like.shape[1:], like.dtype, like.device)

    def rows(self, indices: Sequence[int]) -> "PerSampleNoise":
        """The streams of rows ``indices`` alone: the same generators, so its draws advance them here too."""
        part = PerSampleNoise([])
        part.generators = [self.generators[i] for i in indices]
        return part

    def _draw(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        draws = torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in self.generators])
        if device.type == "cuda":
            # pinned and non-blocking: a pageable copy would wait for the GPU to drain (a host sync per draw)
            return draws.pin_memory().to(device, non_blocking=True)
        return draws.to(device)


def generator_noise(generator: torch.Generator | None = None) -> NoiseSource:
    """Noise for the whole batch from one generator (``None``: the global RNG): for batches whose rows need
    not be reproducible one by one, such as the many samples of a statistical test."""

    def draw(like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    return draw

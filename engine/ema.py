"""Exponential moving average of a module's weights: a fixed decay, or EDM2's power-function profile."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

# The widest power-function profile, gamma = 0 (a plain running mean of every step): std = sqrt(1 / 12).
MAX_EMA_STD = math.sqrt(1 / 12)


def power_profile_std(exponent: float) -> float:
    """Relative standard deviation of the power-function EMA profile ``p(tau) ~ tau ** exponent`` on [0, 1]
    (Karras et al. 2024, EDM2): its width as a share of the steps trained so far."""
    g = exponent
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def power_profile_exponent(std: float) -> float:
    """The exponent ``gamma >= 0`` whose profile has relative standard deviation ``std`` (bisection: the std falls
    monotonically from ``MAX_EMA_STD`` at gamma = 0 towards 0)."""
    if not 0.0 < std < MAX_EMA_STD:
        raise ValueError(f"a power-function EMA std must be in (0, {MAX_EMA_STD:.4f}), got {std}")
    low, high = 0.0, 1.0
    while power_profile_std(high) > std:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if power_profile_std(middle) > std else (low, middle)
    return (low + high) / 2


class EMA:
    """Keeps ``shadow = decay_n * shadow + (1 - decay_n) * weights`` after the n-th optimizer step.

    With ``decay`` the decay is fixed, ramped up as ``min(decay, (1 + n) / (10 + n))`` so that short runs are not
    dominated by the random initialisation. With ``std`` it follows EDM2's power-function profile,
    ``decay_n = (1 - 1 / n) ** (gamma + 1)``: the shadow is the average of every step's weights weighted by
    ``step ** gamma``, a window whose width stays ``std`` of the steps so far however long the run is (a fixed
    decay averages over ~1 / (1 - decay) steps, which is most of a short run and a sliver of a long one).
    Shadows are float32 whatever the training precision.
    """

    def __init__(self, module: nn.Module, decay: float = 0.0, *, std: float = 0.0) -> None:
        if (decay > 0) == (std > 0):
            raise ValueError(f"give an EMA either a decay or a std, not both or neither (decay={decay}, std={std})")
        if decay and not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.exponent = power_profile_exponent(std) if std else None
        self.module = module
        self.decay = decay
        self.std = std
        self.num_updates = 0
        tracked = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self.params = [p for _, p in tracked]  # looked up once, not on every optimizer step
        self.shadow = {name: p.detach().float().clone() for name, p in tracked}

    def current_decay(self) -> float:
        """The decay of the update that made the current shadow (``num_updates`` >= 1)."""
        n = self.num_updates
        if self.exponent is not None:
            return (1 - 1 / n) ** (self.exponent + 1)
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        params = [p.detach().float() for p in self.params]
        torch._foreach_lerp_(list(self.shadow.values()), params, 1.0 - self.current_decay())

    @contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the module (e.g. to sample or save)."""
        params = self.params
        backup = [p.detach().clone() for p in params]
        for p, s in zip(params, self.shadow.values()):
            p.copy_(s)
        try:
            yield
        finally:
            for p, b in zip(params, backup):
                p.copy_(b)

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "decay": self.decay, "std": self.std, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the module (differs in {sorted(missing)[:5]})")
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

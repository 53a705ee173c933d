"""Exponential moving average of a module's weights."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class EMA:
    """Keeps ``shadow = decay * shadow + (1 - decay) * weights`` after every optimizer step.

    The effective decay ramps up as ``min(decay, (1 + n) / (10 + n))`` so that short runs are not
    dominated by the random initialisation. Shadows are float32 whatever the training precision.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module = module
        self.decay = decay
        self.num_updates = 0
        tracked = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self.params = [p for _, p in tracked]  # looked up once, not on every optimizer step
        self.shadow = {name: p.detach().float().clone() for name, p in tracked}

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        params = [p.detach().float() for p in self.params]
        torch._foreach_lerp_(list(self.shadow.values()), params, 1.0 - decay)

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
        return {"num_updates": self.num_updates, "decay": self.decay, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the module (differs in {sorted(missing)[:5]})")
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

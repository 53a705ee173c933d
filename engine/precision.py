"""Mixed precision: the one autocast rule outside training, and GroupNorm/LayerNorm that can run in autocast's bf16."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def inference_autocast(device: torch.device | str) -> torch.autocast:
    """bf16 autocast on CUDA, as in training (``TrainConfig.precision='auto'``); full precision elsewhere, where
    bf16 is slow and the runs are tests and smoke runs."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class _LowPrecisionNorm(nn.Module):
    """The switch both norms share: when ``low_precision`` is set and autocast is on, normalise in autocast's
    dtype rather than in the fp32 that CUDA autocast runs normalisation layers in (see ``GroupNorm``)."""

    low_precision = False

    def forward(self, x: Tensor) -> Tensor:
        if not self.low_precision or not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(x.device.type)
        weight, bias = (None if p is None else p.to(dtype) for p in (self.weight, self.bias))
        with torch.autocast(x.device.type, enabled=False):
            return self.normalise(x.to(dtype), weight, bias)

    def normalise(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        raise NotImplementedError


class GroupNorm(_LowPrecisionNorm, nn.GroupNorm):
    """``nn.GroupNorm`` that, when ``low_precision`` is set and autocast is on, runs in autocast's dtype.

    CUDA autocast runs normalisation layers in fp32: a bf16 activation is read, normalised and written back in
    fp32, then cast again by the next convolution. That traffic is most of a UNet step's pointwise time. In bf16
    the kernel still accumulates its mean and variance in fp32; only the output is rounded. Off by default
    (``TrainConfig.low_precision_norms``); the weights and state-dict keys are those of ``nn.GroupNorm``.
    """

    def normalise(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)


class LayerNorm(_LowPrecisionNorm, nn.LayerNorm):
    """``nn.LayerNorm`` with the same ``low_precision`` switch as ``GroupNorm`` (see there)."""

    def normalise(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


LOW_PRECISION_NORMS = (GroupNorm, LayerNorm)  # the norms with the switch (``.low_precision``)


def set_low_precision_norms(module: nn.Module, enabled: bool) -> int:
    """Switch every ``GroupNorm``/``LayerNorm`` of this module in or out of low precision; returns how many there
    are (plain ``nn`` norms are not switched: a model opts in by building its norms from this module)."""
    norms = [m for m in module.modules() if isinstance(m, LOW_PRECISION_NORMS)]
    for norm in norms:
        norm.low_precision = enabled
    return len(norms)

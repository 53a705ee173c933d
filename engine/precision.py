"""Mixed precision outside training: one rule for every stage, pipeline and benchmark."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def inference_autocast(device: torch.device | str) -> torch.autocast:
    """bf16 autocast on CUDA, as in training (``TrainConfig.precision='auto'``); full precision elsewhere, where
    bf16 is slow and the runs are tests and smoke runs."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that, when ``low_precision`` is set and autocast is on, runs in autocast's dtype.

    CUDA autocast runs normalisation layers in fp32: a bf16 activation is read, normalised and written back in
    fp32, then cast again by the next convolution. That traffic is most of a UNet step's pointwise time. In bf16
    the kernel still accumulates its mean and variance in fp32; only the output is rounded. Off by default
    (``TrainConfig.low_precision_norms``); the weights and state-dict keys are those of ``nn.GroupNorm``.
    """

    low_precision = False

    def forward(self, x: Tensor) -> Tensor:
        dtype = _low_precision_dtype(self, x)
        if dtype is None:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x.to(dtype), self.num_groups, _cast(self.weight, dtype), _cast(self.bias, dtype),
                                self.eps)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` with the same ``low_precision`` switch as ``GroupNorm`` (see there)."""

    low_precision = False

    def forward(self, x: Tensor) -> Tensor:
        dtype = _low_precision_dtype(self, x)
        if dtype is None:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.to(dtype), self.normalized_shape, _cast(self.weight, dtype),
                                _cast(self.bias, dtype), self.eps)


def _low_precision_dtype(norm: GroupNorm | LayerNorm, x: Tensor) -> torch.dtype | None:
    """Autocast's dtype when ``norm`` should run in it, else None (the plain layer's behaviour)."""
    if not norm.low_precision or not torch.is_autocast_enabled(x.device.type):
        return None
    return torch.get_autocast_dtype(x.device.type)


def _cast(param: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if param is None else param.to(dtype)


def set_low_precision_norms(module: nn.Module, enabled: bool) -> int:
    """Switch every ``GroupNorm``/``LayerNorm`` of this module in or out of low precision; returns how many there
    are (plain ``nn`` norms are not switched: a model opts in by building its norms from this module)."""
    norms = [m for m in module.modules() if isinstance(m, (GroupNorm, LayerNorm))]
    for norm in norms:
        norm.low_precision = enabled
    return len(norms)

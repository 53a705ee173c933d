"""Mixed precision outside training: one rule for every stage, pipeline and benchmark."""

from __future__ import annotations

import torch


def inference_autocast(device: torch.device | str) -> torch.autocast:
    """bf16 autocast on CUDA, as in training (``TrainConfig.precision='auto'``); full precision elsewhere, where
    bf16 is slow and the runs are tests and smoke runs."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

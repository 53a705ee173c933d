"""A sub-module's training forward and backward replayed from CUDA graphs (``TrainConfig.cuda_graph``).

At 32×32 latents the eager UNet step leaves the GPU idle about a fifth of the time while Python launches its
thousands of small kernels (docs/BENCHMARKS.md). ``torch.cuda.make_graphed_callables`` captures the forward and
the backward once and replays each as one launch: the same kernels as eager, without torch.compile's minutes
of compiling. The loss around the module, the optimizer and the EMA stay eager.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from .config import ConfigError, TrainConfig

Signature = tuple[tuple[tuple[int, ...], torch.dtype, bool], ...]


def _signature(args: tuple[Tensor, ...]) -> Signature:
    return tuple((tuple(a.shape), a.dtype, a.requires_grad) for a in args)


def check_cuda_graph(cfg: TrainConfig, device: torch.device, world_size: int, replayable: bool = True) -> None:
    """Raise ``ConfigError`` when ``cfg.cuda_graph`` asks for replay where there is none: off CUDA, under several
    processes, or in a stage without a module to replay (``replayable``). The rest is ``TrainConfig.validate``'s."""
    if not cfg.cuda_graph:
        return
    where = ("this stage has nothing to replay (the UNet stage has)" if not replayable else
             f"this run is on {device}" if device.type != "cuda" else
             f"this run has {world_size} processes" if world_size > 1 else None)
    if where is not None:
        raise ConfigError(f"cuda_graph=true replays CUDA graphs in one CUDA process, but {where}; set "
                          "cuda_graph=false")


def replay_training_calls(module: nn.Module) -> Callable[[], None]:
    """From its first call in training mode with gradients on, ``module`` runs its forward and backward as CUDA
    graphs captured on that call's tensors; calls in eval mode or without gradients (validation, sample grids)
    run its own forward. Every training call must pass tensors (positional) of the captured shapes, dtypes and
    ``requires_grad``: a graph replays fixed buffers, so another batch shape is refused, not broadcast.

    Needs, as ``Trainer`` checks for ``cuda_graph``: one CUDA process, no torch.compile, one micro-batch per
    optimizer step (the backward graph rewrites the gradient buffers the parameters' ``.grad`` may share, so a
    second micro-batch would overwrite the first's), no host sync inside the module, and autocast, if any, with
    ``cache_enabled=False``. Parameters may change in place (optimizer steps, EMA swaps, rollbacks), never be
    replaced: the graphs read them where they were at capture.

    Returns ``release``: back to the module's own forward, and the graphs with their memory (the forward's
    activations, held for the backward) freed at once rather than when Python collects the reference cycle
    the replaying forward makes with its module.
    """
    eager_forward = module.forward
    captured: dict[str, Any] = {}

    def forward(*args: Tensor) -> Any:
        if not (module.training and torch.is_grad_enabled()):
            return eager_forward(*args)
        signature = _signature(args)
        if not captured:
            del module.forward  # make_graphed_callables graphs the class's forward and installs its own
            sample = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
            # torch makes the parameters' gradient accumulators on the side stream it captures on (it warns at the
            # first replay that their stream is not the training stream's); made on the training stream first,
            # they break the backward's capture (cudaErrorStreamCaptureInvalidated; tried on an H200)
            torch.cuda.make_graphed_callables(module, sample, allow_unused_input=True)
            captured.update(graphed=module.forward, signature=signature)
            module.forward = forward
        elif signature != captured["signature"]:
            raise RuntimeError(f"{type(module).__name__} replays CUDA graphs captured for inputs "
                               f"{captured['signature']}, got {signature}; train with fixed batch shapes, or "
                               "set cuda_graph=false")
        return captured["graphed"](*args)

    module.forward = forward

    def release() -> None:
        module.__dict__.pop("forward", None)
        captured.clear()

    return release

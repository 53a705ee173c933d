"""Where a training step first turns non-finite: the trainer's diagnosis of a log interval in which no step, or
fewer than half, had a finite gradient, so that its message names a place to look, not only a learning rate to
lower.

``locate_nonfinite`` replays one batch through the training module, forward and backward, with a hook on every
sub-module, and reports the first of: non-finite weights, a non-finite batch, the first sub-module whose forward
output is not finite (or, when its input already was not, the code of its caller just before it), a non-finite
loss from finite outputs, or the module whose weights' gradients are the last (in forward order) not to be
finite. Backward runs from the loss towards the input, so the place a gradient first went non-finite is at or
just after that module.

A gradient that goes non-finite in the backward from a finite forward is the mark of cuDNN's fused attention
backward, which torch's SDPA picks by default on Hopper GPUs and which has returned NaN gradients for finite
inputs (pytorch/pytorch#196678, NVIDIA/cudnn-frontend#1072). So such a finding is replayed once more, with the
same random draws and cuDNN's attention kernels off (``cudnn_attention``), and the finding says whether that
replay was finite: then cuDNN's attention made it, and the trainer turns it off for the rest of the stage
(``TrainConfig.cudnn_attention`` turns it off from the start).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import Tensor, nn


class Finding(NamedTuple):
    """What a replay found: ``where``, one phrase for the trainer's line and log; ``made_by_cudnn_attention``,
    whether the same replay was finite with cuDNN's attention kernels off."""

    where: str
    made_by_cudnn_attention: bool = False


@contextmanager
def cudnn_attention(enabled: bool) -> Iterator[None]:
    """While it is open, SDPA may (or may not) pick cuDNN's attention kernels; the previous setting comes back
    after. Off, it falls back to the flash or memory-efficient kernels (and the math one on the CPU)."""
    previous = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(previous)


def _leaves(value: Any, name: str = "") -> Iterator[tuple[str, Any]]:
    """What nested tuples, lists and dicts hold, each with its path (``latents``, ``[1]``)."""
    if isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            yield from _leaves(item, f"{name}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{name}.{key}" if name else str(key))
    else:
        yield name, value


def _nonfinite(value: Any) -> list[str]:
    """The paths of the floating-point tensors in ``value`` that hold a value that is not finite."""
    return [name for name, leaf in _leaves(value)
            if isinstance(leaf, Tensor) and leaf.is_floating_point() and not torch.isfinite(leaf).all()]


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _replay(module: nn.Module, batch: Any, loss_of: Callable[[Any], Tensor]) -> tuple[str, str]:
    """One forward and backward with the hooks: ``(kind, phrase)``, kind one of weights, batch, forward, loss,
    backward, finite."""
    weights = [name for name, p in module.named_parameters() if not torch.isfinite(p).all()]
    if weights:
        return "weights", f"non-finite weights ({_listed(weights)})"
    if bad_batch := _nonfinite(batch):
        return "batch", f"a non-finite batch ({_listed(bad_batch)})"

    forward_order: list[tuple[str, nn.Module]] = []  # modules with weights of their own, as their forwards ended
    first_output: list[str] = []

    def look(name: str) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(sub: nn.Module, inputs: tuple, output: Any) -> None:
            if any(True for _ in sub.parameters(recurse=False)):
                forward_order.append((name, sub))
            if not first_output and _nonfinite(output):
                first_output.append(f"at the output of {name}" if not _nonfinite(inputs) else
                                    f"in the code just before {name} (its input was not finite)")
        return hook

    handles = [sub.register_forward_hook(look(name or type(module).__name__)) for name, sub in module.named_modules()]
    try:
        loss = loss_of(batch)
        if first_output:
            return "forward", f"first non-finite in the forward, {first_output[0]}"
        if not torch.isfinite(loss).all():
            return "loss", "a non-finite loss from finite outputs"
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    with_bad_grads = [name for name, sub in forward_order
                      if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in sub.parameters(False))]
    if with_bad_grads:
        return "backward", (f"first non-finite gradients in the backward, at or just after {with_bad_grads[-1]} (the "
                            "last module in forward order whose weights' gradients are not finite)")
    return "finite", "finite throughout (the skipped steps depended on their own batches or noise)"


def locate_nonfinite(module: nn.Module, batch: Any, loss_of: Callable[[Any], Tensor]) -> Finding:
    """Run ``loss_of(batch)`` (the training module's forward on ``batch``, returning the loss) and its backward
    with hooks on every sub-module of ``module``, and say in one phrase where a value first stopped being finite
    ("first non-finite in the forward, at the output of down.1.attn", ...). A backward finding with cuDNN's
    attention kernels on is replayed with them off, from the same random state (the global streams and any
    ``torch.Generator`` in ``batch``), and the finding says whether that was finite.

    Leaves gradients in ``module``'s parameters (the caller zeroes them) and the random streams advanced (the
    caller restores them if it needs them).
    """
    generators = [leaf for _, leaf in _leaves(batch) if isinstance(leaf, torch.Generator)]  # the stage's own
    states = [g.get_state() for g in generators]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):  # the second replay starts from the first one's random state
        kind, found = _replay(module, batch, loss_of)
    if kind != "backward" or not torch.backends.cuda.cudnn_sdp_enabled():
        return Finding(found)
    for generator, state in zip(generators, states):
        generator.set_state(state)
    for p in module.parameters():
        p.grad = None
    with cudnn_attention(False):
        again, _ = _replay(module, batch, loss_of)
    if again == "finite":
        return Finding(found + "; finite with cuDNN's attention kernels off", made_by_cudnn_attention=True)
    return Finding(found + "; not finite with cuDNN's attention kernels off either")

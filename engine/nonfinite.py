"""Where a training step first turns non-finite: the trainer's diagnosis of a log interval in which no step had a
finite gradient, so that its message names a place to look, not only a learning rate to lower.

``locate_nonfinite`` replays one batch through the training module, forward and backward, with a hook on every
sub-module, and reports the first of: non-finite weights, a non-finite batch, the first sub-module whose forward
output is not finite (or, when its input already was not, the code of its caller just before it), a non-finite
loss from finite outputs, or the module whose weights' gradients are the last (in forward order) not to be
finite. Backward runs from the loss towards the input, so the place a gradient first went non-finite is at or
just after that module.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn


def _named_tensors(value: Any, name: str = "") -> Iterator[tuple[str, Tensor]]:
    """The floating-point tensors inside nested tuples, lists and dicts, each with its path (``latents``, ``[1]``)."""
    if isinstance(value, Tensor):
        if value.is_floating_point():
            yield name, value
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            yield from _named_tensors(item, f"{name}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _named_tensors(item, f"{name}.{key}" if name else str(key))


def _nonfinite(value: Any) -> list[str]:
    return [name for name, tensor in _named_tensors(value) if not torch.isfinite(tensor).all()]


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def locate_nonfinite(module: nn.Module, batch: Any, loss_of: Callable[[Any], Tensor]) -> str:
    """Run ``loss_of(batch)`` (the training module's forward on ``batch``, returning the loss) and its backward
    with hooks on every sub-module of ``module``, and say in one phrase where a value first stopped being finite
    ("first non-finite in the forward, at the output of down.1.attn", ...).

    Leaves gradients in ``module``'s parameters (the caller zeroes them) and uses the RNG as its forward does (the
    caller keeps its state).
    """
    weights = [name for name, p in module.named_parameters() if not torch.isfinite(p).all()]
    if weights:
        return f"non-finite weights ({_listed(weights)})"
    if _nonfinite(batch):
        return f"a non-finite batch ({_listed(_nonfinite(batch))})"

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
            return f"first non-finite in the forward, {first_output[0]}"
        if not torch.isfinite(loss).all():
            return "a non-finite loss from finite outputs"
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    with_bad_grads = [name for name, sub in forward_order
                      if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in sub.parameters(False))]
    if with_bad_grads:
        return (f"first non-finite gradients in the backward, at or just after {with_bad_grads[-1]} (the last "
                "module in forward order whose weights' gradients are not finite)")
    return "finite throughout (the skipped steps depended on their own batches or noise)"

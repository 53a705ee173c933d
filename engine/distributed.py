"""Process-group set-up for ``torchrun`` (PyTorch DDP); a plain single process when not launched by it."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | torch.device | None = None, flag: str = "--device") -> torch.device:
    """``device`` as a torch device (default: CUDA when there is one, else the CPU); a name torch cannot read, a
    kind other than cpu and cuda (the code paths this project has), or a GPU this machine does not have, is a user
    error before any work (``flag``: the option that named it)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"{flag} {device} is no device torch knows; pass e.g. cuda, cuda:1 or cpu") from None
    if resolved.type not in ("cpu", "cuda"):
        raise UserError(f"{flag} {device}: this project runs on cpu or cuda; pass one of those")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if resolved.type == "cuda" and (resolved.index or 0) >= count:
        gpus = {0: "none", 1: "one, cuda:0"}.get(count, f"cuda:0 to cuda:{count - 1}")
        raise UserError(f"{flag} {device}: this machine's CUDA devices: {gpus}; pass "
                        + ("cpu" if not count else "one of them or cpu"))
    return resolved


def setup(device: str | torch.device | None = None) -> DistEnv:
    """Join the process group that ``torchrun`` describes in the environment (idempotent).

    NCCL on CUDA, gloo on CPU. Without ``WORLD_SIZE`` > 1 this is one process on ``device``
    (default: CUDA when available).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = resolve_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    if device.type == "cuda" and device.index >= torch.cuda.device_count():  # a rank past this machine's GPUs
        raise UserError(f"process {local_rank} on this machine has no GPU of its own ({torch.cuda.device_count()} "
                        "visible): start at most one process per GPU (torchrun --nproc-per-node)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistEnv(rank=rank, world_size=world_size if dist.is_initialized() else 1, local_rank=local_rank, device=device)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all processes (a no-op in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def cleanup() -> None:
    """Leave the process group. A garbage collection first: a DDP wrapper still held in a reference cycle would keep
    gloo's process group until the interpreter's teardown, where freeing its work can abort the process."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()

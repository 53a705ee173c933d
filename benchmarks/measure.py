"""Timing, peak memory, FLOP counting and host-sync counting for the benchmark."""

from __future__ import annotations

import gc
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Measurement:
    seconds_per_iter: float
    first_call_s: float  # the first call alone: torch.compile / CUDA-graph capture happen here
    peak_mem_gb: float | None  # max allocated tensor memory during the case, weights included (CUDA only)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """While it is open, cuDNN times its candidate convolution algorithms for each new shape
    (``torch.backends.cudnn.benchmark``) instead of taking its heuristics' choice; the previous setting comes back
    after. A process keeps the first algorithm it picked for a shape either way, so two settings compare in two
    processes, not one after the other in one."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def release_memory(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks so the next case starts from an empty GPU."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(call: Callable[[], Any], warmup: int, iters: int, device: torch.device) -> Measurement:
    """Time ``iters`` calls after ``warmup`` calls (the first of which is timed on its own)."""
    if warmup < 1 or iters < 1:
        raise ValueError(f"need warmup >= 1 and iters >= 1, got warmup={warmup}, iters={iters}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = time.perf_counter()
    call()
    synchronize(device)
    first_call_s = time.perf_counter() - started
    for _ in range(warmup - 1):
        call()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(iters):
        call()
    synchronize(device)
    seconds = (time.perf_counter() - started) / iters
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return Measurement(seconds_per_iter=seconds, first_call_s=first_call_s, peak_mem_gb=peak)


def count_flops(call: Callable[[], Any]) -> int:
    """FLOPs of one call as torch's FLOP counter sees them (matmuls, convolutions, attention; 2 per MAC)."""
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def training_flops(forward: Callable[[], Any]) -> int:
    """Model FLOPs of one training step: 3x the forward's, the backward counted as twice the forward (the MFU
    convention). Counting the backward itself would also charge fused attention's recompute of Q K^T in its
    backward: work the kernel chooses to do, not work the model asks for."""
    return 3 * count_flops(forward)


def count_host_syncs(call: Callable[[], Any], device: torch.device) -> int | None:
    """How many times one call blocks the host on the GPU (CUDA's sync debug mode); None off CUDA."""
    if device.type != "cuda":
        return None
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)

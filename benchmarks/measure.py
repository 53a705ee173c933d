"""Timing, peak memory, FLOP counting, host-sync counting and CUDA-graph replay for the benchmark."""

from __future__ import annotations

import gc
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Measurement:
    seconds_per_iter: float
    first_call_s: float  # the first call alone: torch.compile / CUDA-graph capture happen here
    peak_mem_gb: float | None  # max allocated tensor memory during the case, weights included (CUDA only)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


class CudaGraphCall:
    """Replays one captured call of ``fn(*tensors)`` with static input buffers.

    The first call warms ``fn`` up on a side stream (running any torch.compile there), then captures it;
    later calls copy their inputs into the buffers and replay, skipping the per-kernel launch cost. The
    output is the same static tensor every time, overwritten by the next replay: use it before then.
    Autocast's weight-cast cache must be off during capture (the cached copies would be freed after it).
    """

    def __init__(self, fn: Callable[..., Tensor], bf16_autocast: bool) -> None:
        self.fn = fn
        self.bf16_autocast = bf16_autocast
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[Tensor] = []
        self.output: Tensor | None = None

    def _autocast(self) -> torch.autocast:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16_autocast, cache_enabled=False)

    def _capture(self, args: tuple[Tensor, ...]) -> None:
        self.inputs = [arg.clone() for arg in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self._autocast():
            for _ in range(3):
                self.fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), self._autocast():
            self.output = self.fn(*self.inputs)

    def __call__(self, *args: Tensor) -> Tensor:
        if self.graph is None:
            self._capture(args)
        for buffer, arg in zip(self.inputs, args, strict=True):
            if buffer.shape != arg.shape:
                raise ValueError(f"CudaGraphCall was captured for input shape {tuple(buffer.shape)}, got "
                                 f"{tuple(arg.shape)}; wrap a new CudaGraphCall for another shape")
            buffer.copy_(arg)
        self.graph.replay()
        return self.output

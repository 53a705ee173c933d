"""The UNet's self-attention shapes through each SDPA back-end (flash, cuDNN, memory-efficient, math): forward and
backward time, TFLOP/s, and the largest difference from the math back-end, per UNet level.

    python -m benchmarks.attention_backends --out docs/results/bench/attention_backends.json
    python -m benchmarks.attention_backends --preset tiny --batch 2      # CPU: seconds (the test)

The shapes come from the preset's UNet config at its training resolution: at level ``i`` the latent side is
``resolution / 8 / 2**i``, the width ``base_channels * channel_mult[i]`` and the heads ``width // head_dim``.
A back-end that cannot run a shape on this machine is recorded with the reason instead of a time.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusion.config import PRESETS, UNetTrainConfig
from engine.cli import add_result_flags, check_counts, check_output_files, command_line
from engine.config import build_config
from engine.distributed import resolve_device
from engine.errors import add_debug_flag, run_cli
from engine.stage import write_json

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def attention_shapes(cfg: UNetTrainConfig, batch: int) -> list[dict[str, int]]:
    """(batch, heads, tokens, head_dim) of the self-attention at every UNet level."""
    side = cfg.resolution // 8
    shapes = []
    for level, mult in enumerate(cfg.model.channel_mult):
        width = cfg.model.base_channels * mult
        tokens = (side // 2 ** level) ** 2
        shapes.append({"level": level, "batch": batch, "heads": width // cfg.model.head_dim, "tokens": tokens,
                       "head_dim": cfg.model.head_dim})
    return shapes


def attention_flops(shape: dict[str, int]) -> float:
    """Forward + backward FLOPs: 4·B·H·N²·d forward (QKᵀ and AV); backward counted as 2.5× (flash recomputes
    the scores)."""
    forward = 4.0 * shape["batch"] * shape["heads"] * shape["tokens"] ** 2 * shape["head_dim"]
    return forward * 3.5


def run_backend(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor,
                warmup: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Mean seconds of one forward + backward under ``backend``, and its output."""
    def once() -> torch.Tensor:
        for t in (q, k, v):
            t.grad = None
        out = F.scaled_dot_product_attention(q, k, v)
        out.backward(grad)
        return out

    with sdpa_kernel([BACKENDS[backend]]):
        for _ in range(warmup):
            out = once()
        if q.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            out = once()
        if q.is_cuda:
            torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats, out.detach()


def measure(shapes: list[dict[str, int]], device: torch.device, dtype: torch.dtype, warmup: int,
            repeats: int) -> list[dict[str, Any]]:
    """One record per shape and back-end: its time and TFLOP/s and its difference from float32 math, or why it
    cannot run."""
    records = []
    for shape in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        size = (shape["batch"], shape["heads"], shape["tokens"], shape["head_dim"])
        q, k, v, grad = (torch.randn(size, device=device, dtype=dtype, generator=g) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)
        with sdpa_kernel([SDPBackend.MATH]):
            reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).detach()
        for name in BACKENDS:
            record: dict[str, Any] = {**shape, "backend": name}
            try:
                seconds, out = run_backend(name, q, k, v, grad, warmup, repeats)
            except RuntimeError as error:  # "No available kernel" and kin: this back-end can't run the shape here
                record["unsupported"] = str(error).splitlines()[0][:200]
            else:
                record.update(ms=seconds * 1e3, tflops=attention_flops(shape) / seconds / 1e12,
                              max_abs_diff_from_math=float((out.float() - reference).abs().max()))
            records.append(record)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}, flush=True)
    return records


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="full")
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's training batch")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    add_result_flags(parser)
    parser.add_argument("--device", default=None, help="default: cuda when there is one (bf16), else cpu (float32)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    check_output_files(args, "--out")
    check_counts(args, "--warmup", "--repeats", "--batch")
    cfg = build_config(UNetTrainConfig, PRESETS, args.preset, {})
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = attention_shapes(cfg, args.batch or cfg.train.batch_size)
    command = command_line("python -m benchmarks.attention_backends", argv)
    results = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
               "dtype": str(dtype), "preset": args.preset, "command": command,
               "records": measure(shapes, device, dtype, args.warmup, args.repeats)}
    if args.out:
        write_json(args.out, results)
    return results


if __name__ == "__main__":
    run_cli(main)

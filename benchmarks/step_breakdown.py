"""Where a UNet training step's time goes: the engine's real step (compiled as the preset says), profiled, its
device time split by op class, beside the step's model FLOPs and MFU.

    python -m benchmarks.step_breakdown --out docs/results/bench/step_breakdown.json
    python -m benchmarks.step_breakdown --set compile=false --set resolution=256   # another configuration
    python -m benchmarks.step_breakdown --preset tiny --steps 2                    # CPU: seconds (the test)
    python -m benchmarks.step_breakdown --top 40                                   # the 40 busiest kernels

Classes: convolutions, attention, other matmuls (the linear layers), normalisation (with what a compiled kernel
fuses into it), pointwise and other ops, optimizer/EMA/clipping, copies (layout, dtype, memory). On CUDA they
come from the kernels' names and their device time; on a CPU from the aten ops' self time. "Idle" is the step's
wall time minus the busy time: launch gaps and host work, what CUDA graphs or fewer kernels would win back. FLOPs
are model FLOPs, 3x torch's FLOP counter on one eager forward (``measure.training_flops``); MFU divides them by
the step's time and ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from typing import Any, Callable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.measure import training_flops
from benchmarks.step_speed import run_steps, step_indices, timed_steps, unet_trainer
from engine import Trainer
from engine.cli import add_result_flags, check_counts, check_output_files, command_line
from engine.config import parse_overrides
from engine.distributed import resolve_device
from engine.errors import add_debug_flag, run_cli
from engine.stage import write_json

OTHER = "pointwise and other"
NORM = r"norm(?!al)|moments|welford"
# (class, pattern) in order: the first match names an op. Attention goes before convolution because cuDNN's
# SDPA kernels are named like its convolutions (..._sdpa_..._flash_fprop_...), and convolution before matmul
# because Hopper's cuDNN convolutions are GEMM kernels too (sm90_xmma_fprop/dgrad/wgrad_implicit_gemm). A
# compiled (Triton) kernel is one fused pass named after its ops: normalisation when a norm is among them,
# else pointwise, even when it also casts (``_to_copy``). cuDNN's SDPA backward has two helper kernels of its own
# (the dot of dO and O, dQ's cast to 16 bits: "convert" must not read as a convolution), and cuDNN turns each
# NCHW convolution's input into NHWC and its output back in kernels named after the layouts: copies.
OP_CLASSES = (
    ("optimizer, EMA and clipping", r"adam|multi_tensor|foreach|lerp"),
    ("attention", r"flash|fmha|attention|sdpa|scaled_dot_product|compute_dot_do_o|convert_dq_to"),
    ("convolution", r"conv(?!ert)|fprop|dgrad|wgrad|implicit_gemm|winograd|im2col|col2im"),
    ("matmul", r"gemm|matmul|cutlass|nvjet|cublas|aten::(mm|addmm|bmm|baddbmm|linear)\b|xmma"),
    ("normalisation", NORM),
    (OTHER, r"^triton_"),
    ("copies (layout, dtype, memory)", r"copy|memcpy|memset|cat_|catarray|aten::cat\b|aten::to\b|contiguous|clone|"
                                       r"nchwtonhwc|nhwctonchw"),
)
# CPU profiles list composite ops (aten::linear over aten::addmm ...); self time counts each instant once, but
# the profiler's bookkeeping rows are not ops.
NOT_OPS = re.compile(r"^(ProfilerStep|Optimizer\.|## |enumerate\(DataLoader\)|cuda(Launch|Stream|Device|Event|"
                     r"Memcpy|Memset|GetDevice|PeekAtLastError|FuncGetAttributes|Occupancy)|Torch-Compiled Region|"
                     r"CompiledFunction|autograd::engine)")


# Inductor's generated pointwise and reduction kernels: one fused pass, named after every op it fuses, a
# convolution's bias or its GroupNorm included (triton_red_fused_convolution_native_group_norm_1): what it
# computes is the norm or the pointwise work, the convolution itself is another kernel
FUSED_PASS = re.compile(r"^triton_(poi|red|per)_")


def op_class(name: str) -> str:
    """The class of one kernel or aten op by its name."""
    lowered = name.lower()
    if FUSED_PASS.match(lowered):
        return "normalisation" if re.search(NORM, lowered) else OTHER
    for label, pattern in OP_CLASSES:
        if re.search(pattern, lowered):
            return label
    return OTHER


def split_by_class(events: Sequence[tuple[str, float]]) -> dict[str, float]:
    """Sum ``(name, microseconds)`` rows per class, every class present (0 when none)."""
    totals = dict.fromkeys([label for label, _ in OP_CLASSES], 0.0)
    for name, micros in events:
        if not NOT_OPS.match(name):
            totals[op_class(name)] += micros
    return totals


def top_ops(events: Sequence[tuple[str, float, int]], steps: int, count: int) -> list[dict[str, Any]]:
    """The ``count`` kernels or ops with the most time, per step, from ``(name, microseconds, calls)`` rows over
    ``steps`` steps: where a fusion or a fewer-kernels change would have to act."""
    rows = sorted(((name, micros, calls) for name, micros, calls in events if not NOT_OPS.match(name)),
                  key=lambda row: -row[1])
    return [{"name": name, "class": op_class(name), "ms_per_step": micros / 1e3 / steps,
             "calls_per_step": calls / steps} for name, micros, calls in rows[:count]]


def profiled_step_times(trainer: Trainer, make_batch: Callable, warmup: int, steps: int, top: int = 0
                        ) -> tuple[float, dict[str, float], dict[str, Any]]:
    """Seconds per step (unprofiled), the per-class busy seconds per step (profiled, as many steps again), and
    the launches per step with the ``top`` busiest kernels (or ops off CUDA)."""
    on_cuda = trainer.device.type == "cuda"
    seconds = trainer.cfg.batch_size / timed_steps(trainer, make_batch, warmup, steps)[0]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        run_steps(trainer, make_batch, steps)
    rows = []  # (name, microseconds, calls) of the ops alone: the profiler's bookkeeping rows left out once
    for event in prof.key_averages():
        micros = event.self_device_time_total if on_cuda else event.self_cpu_time_total
        on_device = not on_cuda or event.device_type == torch.autograd.DeviceType.CUDA
        if micros > 0 and on_device and not NOT_OPS.match(event.key):
            rows.append((event.key, micros, event.count))
    launches = {"launches_per_step": sum(calls for _, _, calls in rows) / steps,
                "top_kernels": top_ops(rows, steps, top)}
    busy = split_by_class([(name, micros) for name, micros, _ in rows])
    return seconds, {label: micros / 1e6 / steps for label, micros in busy.items()}, launches


def breakdown(overrides: dict[str, Any], preset: str, warmup: int, steps: int, peak_tflops: float | None,
              device: str | None = None, top: int = 0) -> dict[str, Any]:
    """The step's time per op class, its FLOPs and MFU (``peak_tflops``: the device's dense bf16 peak), its
    launches per step and its ``top`` busiest kernels."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer, make_batch = unet_trainer(overrides, preset, tmp, device=device)

        def forward() -> None:
            with torch.no_grad(), trainer.autocast():
                trainer.module(make_batch(step_indices(trainer)[0], trainer.generator), step=trainer.step)

        flops = training_flops(forward) * trainer.cfg.grad_accum
        seconds, busy, launches = profiled_step_times(trainer, make_batch, warmup, steps, top)
        cfg = trainer.cfg
    busy_total = sum(busy.values())
    classes = {label: {"ms": 1e3 * s, "share_of_step": s / seconds} for label, s in busy.items()}
    classes["idle (launch gaps, host work)"] = {"ms": 1e3 * max(0.0, seconds - busy_total),
                                                "share_of_step": max(0.0, 1 - busy_total / seconds)}
    achieved = flops / seconds / 1e12
    return {"overrides": overrides, "preset": preset, "batch_size": cfg.batch_size, "compile": cfg.compile,
            "step_ms": 1e3 * seconds, "samples_per_s": cfg.batch_size / seconds, "flops_per_step": flops,
            "gflop_per_sample": flops / cfg.batch_size / 1e9, "achieved_tflops": achieved,
            "mfu": achieved / peak_tflops if peak_tflops else None, "classes": classes, **launches,
            "time_source": "CUDA kernels' device time" if str(trainer.device).startswith("cuda") else
            "aten ops' CPU self time"}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"step {result['step_ms']:.1f} ms = {result['samples_per_s']:.1f} samples/s; "
             f"{result['gflop_per_sample']:.3g} GFLOP/sample, {result['achieved_tflops']:.3g} TFLOP/s"
             + (f", MFU {100 * result['mfu']:.1f} %" if result["mfu"] is not None else ""),
             "| op class | ms per step | share of the step |", "|---|---|---|"]
    for label, row in result["classes"].items():
        lines.append(f"| {label} | {row['ms']:.2f} | {100 * row['share_of_step']:.1f} % |")
    if result["top_kernels"]:
        unit = "kernels" if result["time_source"].startswith("CUDA") else "aten ops"
        lines += [f"{result['launches_per_step']:.0f} {unit} per step; the busiest:",
                  "| kernel | class | ms per step | calls per step |", "|---|---|---|---|"]
        lines += [f"| {row['name'][:90]} | {row['class']} | {row['ms_per_step']:.2f} | {row['calls_per_step']:.0f} |"
                  for row in result["top_kernels"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_breakdown", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="full")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a UNet training config override, e.g. compile=false or resolution=256")
    parser.add_argument("--warmup", type=int, default=5, help="steps before timing (compilation happens here)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak for MFU (989: H100/H200 SXM); ignored off CUDA")
    parser.add_argument("--top", type=int, default=20, help="list this many busiest kernels (0: none)")
    parser.add_argument("--device", default=None)
    add_result_flags(parser)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    check_output_files(args, "--out")
    check_counts(args, "--warmup", "--steps")
    overrides = parse_overrides([f"--{item}" for item in args.set])
    on_cuda = resolve_device(args.device).type == "cuda"  # a bad --device stops here, before the UNet is built
    result = breakdown(overrides, args.preset, args.warmup, args.steps, args.peak_tflops if on_cuda else None,
                       args.device, args.top)
    result.update({"gpu": torch.cuda.get_device_name() if on_cuda else "cpu", "torch": torch.__version__,
                   "peak_tflops": args.peak_tflops if on_cuda else None,
                   "command": command_line("python -m benchmarks.step_breakdown", argv)})
    print(format_table(result), flush=True)
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    run_cli(main)

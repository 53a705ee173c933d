"""Training-step throughput of the real VAE and UNet training modules, through the engine, per variant.

    python -m benchmarks.step_speed --out docs/results/bench/step_speed.json
    torchrun --nproc-per-node 2 -m benchmarks.step_speed --variants default --out speed_2gpu.json

Each variant builds the stage's full-preset training module (with overrides), runs warm-up steps, then
times ``--steps`` optimizer steps with CUDA synchronisation at the ends. Synthetic inputs: the point is
speed, not learning. Used to choose the presets' settings (channels-last, crop size, batch, compile).

cuDNN's convolution algorithms come from its heuristics, as the trainers run, unless ``--cudnn-benchmark`` times
the candidates for each shape first (``torch.backends.cudnn.benchmark``; the search falls in the warm-up). A process
keeps the first choice it makes for a shape whichever way it was made, so the two are compared in two processes.

Under torchrun every GPU keeps the preset's batch (the global batch is the preset's times the number of
processes), so samples/s over all GPUs divided by the one-GPU figure is the scaling factor.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.measure import cudnn_benchmark
from engine import Trainer, build_config, distributed
from engine.cli import add_result_flags, check_counts, check_output_files, command_line
from engine.errors import UserError, add_debug_flag, run_cli
from engine.nonfinite import cudnn_attention
from engine.stage import write_json
from engine.trainer import deterministic_algorithms


def step_indices(trainer: Trainer) -> torch.Tensor:
    """The rows of one optimizer step, ``[grad_accum, micro_batch]`` (the synthetic batches ignore them)."""
    return torch.arange(trainer.micro_batch).view(1, -1).expand(trainer.cfg.grad_accum, -1)


def run_steps(trainer: Trainer, make_batch: Callable, steps: int) -> None:
    """``steps`` of the engine's real optimizer step, then wait for the device."""
    indices = step_indices(trainer)
    # as Trainer.fit runs its steps
    with deterministic_algorithms(trainer.cfg.deterministic), cudnn_attention(trainer.cfg.cudnn_attention):
        for _ in range(steps):
            trainer._train_step(make_batch, indices)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(trainer: Trainer, make_batch: Callable, warmup: int, steps: int) -> tuple[float, float]:
    """Samples per second over ``steps`` steps after ``warmup``, and the seconds the warm-up took (compilation
    happens there: what compiling costs a run, beside what it saves per step)."""
    start = time.perf_counter()
    run_steps(trainer, make_batch, warmup)
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    run_steps(trainer, make_batch, steps)
    return steps * trainer.cfg.batch_size / (time.perf_counter() - start), warmup_seconds


def _per_gpu_batch(cfg_cls: type, presets: dict, preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides with the global batch scaled by the number of processes: each GPU keeps the batch one GPU runs
    (the preset's, or the variant's own)."""
    world = distributed.world_size()
    if world == 1:
        return overrides
    batch = int(overrides.get("batch_size", build_config(cfg_cls, presets, preset, overrides).train.batch_size))
    return {**overrides, "batch_size": batch * world}


def vae_speed(overrides: dict[str, Any], preset: str, warmup: int, steps: int) -> tuple[float, float]:
    from vae.config import PRESETS, VAETrainConfig
    from vae.train import build_module
    cfg = build_config(VAETrainConfig, PRESETS, preset, _per_gpu_batch(VAETrainConfig, PRESETS, preset, overrides))
    size = cfg.crop_size or cfg.resolution
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(build_module(cfg), cfg.train, tmp, num_train_items=10_000)
        images = torch.rand(cfg.train.batch_size, 3, size, size, device=trainer.device) * 2 - 1
        images = images.contiguous(memory_format=trainer.memory_format)
        # past disc_start_step, so the adversarial term (and its adaptive weight) is timed too
        trainer.step = cfg.disc_start_step + 1
        return timed_steps(trainer, lambda idx, g: images[: len(idx)], warmup, steps)


def unet_trainer(overrides: dict[str, Any], preset: str, out_dir: str | Path,
                 device: str | None = None) -> tuple[Trainer, Callable]:
    """The engine's UNet training step at the preset (+ overrides), on one fixed synthetic batch: a trainer and
    its ``make_batch``. The batch carries augmentation labels when the preset augments, as training does."""
    from diffusion.config import PRESETS, UNetTrainConfig
    from diffusion.losses import DiffusionTrainingModule
    from diffusion.schedule import NoiseSchedule
    from unet.model import UNet
    cfg = build_config(UNetTrainConfig, PRESETS, preset, _per_gpu_batch(UNetTrainConfig, PRESETS, preset, overrides))
    cfg.model = cfg.filled_model(text_width=256)
    size = cfg.resolution // 8
    module = DiffusionTrainingModule(UNet(cfg.model), NoiseSchedule(cfg.schedule), cfg.prediction_type, cfg.loss)
    trainer = Trainer(module, cfg.train, out_dir, num_train_items=10_000, ema_of=module.model,
                      cuda_graph_of=module.model, device=device)
    b, device = trainer.micro_batch, trainer.device
    latents = torch.randn(b, 4, size, size, device=device).contiguous(memory_format=trainer.memory_format)
    batch = {"latents": latents, "context": torch.randn(b, 77, cfg.model.context_dim, device=device),
             "image_ids": torch.arange(b, device=device), "generator": trainer.generator}
    if cfg.model.augment_dim:
        batch["augment"] = torch.zeros(b, cfg.model.augment_dim, device=device)
    trainer.step = 10_000  # past the consistency warm-up
    return trainer, lambda idx, g: batch


def compile_regions(unet: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Compile each ResBlock and SpatialTransformer of ``unet`` in place (regional compilation: small graphs that
    blocks of one shape share, dynamo treating their weights as inputs, against one graph of the whole training
    step, whose compile took minutes at every resolution: docs/BENCHMARKS.md). Returns the dynamo settings to run
    them under: the blocks share one code object, so the recompile limit must hold a graph per block shape."""
    from unet.blocks import ResBlock, SpatialTransformer
    blocks = [module for module in unet.modules() if isinstance(module, (ResBlock, SpatialTransformer))]
    for block in blocks:
        block.compile(dynamic=False)
    limit = 4 * len(blocks)
    return torch._dynamo.config.patch(recompile_limit=limit, accumulated_recompile_limit=limit)


REGIONAL = "regional_compile"  # a variant key, not a config one: compile_regions on the built UNet


def unet_speed(overrides: dict[str, Any], preset: str, warmup: int, steps: int) -> tuple[float, float]:
    overrides = dict(overrides)
    regional = overrides.pop(REGIONAL, False)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, make_batch = unet_trainer(overrides, preset, tmp)
        with compile_regions(trainer.module.model) if regional else contextlib.nullcontext():
            return timed_steps(trainer, make_batch, warmup, steps)


LOWRES = {"resolution": 256, "batch_size": 256}  # the UNet's low-resolution phase (lowres_factor, lowres_batch_size)
VARIANTS = {
    "vae": [("default", {}), ("channels_last", {"channels_last": True}),
            ("fp32_norms", {"low_precision_norms": False}),
            ("crop128_b64", {"crop_size": 128, "batch_size": 64}),
            ("crop128_b64_channels_last", {"crop_size": 128, "batch_size": 64, "channels_last": True}),
            ("base32_mult1248_channels_last", {"model.base_channels": 32, "model.channel_mult": (1, 2, 4, 8),
                                               "channels_last": True})],
    # the UNet's full preset trains eager in two phases (since 2026-12-02): 256 px in batches of 256, then 512 px
    # (step_speed.json predates that); norms in bf16 since 2026-12-03 (step_speed_norms.json: "default" was fp32)
    "unet": [("default", {}), ("lowres", LOWRES),
             ("compile", {"compile": True}), ("lowres_compile", {"compile": True, **LOWRES}),
             ("fp32_norms", {"low_precision_norms": False}),
             ("lowres_fp32_norms", {"low_precision_norms": False, **LOWRES}),
             ("channels_last", {"channels_last": True}),
             ("compile_channels_last", {"compile": True, "channels_last": True}),
             ("deterministic", {"deterministic": True}), ("lowres_deterministic", {"deterministic": True, **LOWRES}),
             ("regional_compile", {REGIONAL: True}), ("lowres_regional_compile", {REGIONAL: True, **LOWRES}),
             ("cuda_graph", {"cuda_graph": True}), ("lowres_cuda_graph", {"cuda_graph": True, **LOWRES}),
             ("no_cudnn_attention", {"cudnn_attention": False}),
             ("lowres_no_cudnn_attention", {"cudnn_attention": False, **LOWRES})],
}


def timed_variant(stage: str, name: str, overrides: dict[str, Any], args: argparse.Namespace,
                  env: distributed.DistEnv) -> dict[str, Any]:
    """One variant's record (its samples/s, warm-up and peak memory, or the error that stopped it), printed."""
    try:
        speed, warmup_s = (vae_speed if stage == "vae" else unet_speed)(overrides, args.preset, args.warmup, args.steps)
        peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
        record = {"samples_per_s": speed, "warmup_s": warmup_s, "peak_mem_gb": peak}
        shown = f"{speed:.1f} samples/s over {env.world_size} process(es), warm-up {warmup_s:.1f} s  peak {peak}"
    except Exception as err:  # a variant this preset or device cannot run: reported, the others measured
        record = {"error": f"{type(err).__name__}: {err}"[:200]}
        shown = f"failed: {record['error']}"
    if env.is_main:
        print(f"{stage:5s} {name:22s} {shown}", flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {**record, "overrides": overrides}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_debug_flag(parser)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--stages", default="vae,unet")
    parser.add_argument("--variants", default=None, help="comma list of variant names to run (default: all)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN time its convolution algorithms per shape (default: its heuristics, as the "
                             "trainers run)")
    add_result_flags(parser)
    args = parser.parse_args(argv)
    check_output_files(args, "--out")
    wanted = set(args.variants.split(",")) if args.variants else None
    stages = args.stages.split(",")
    unknown = set(stages) - set(VARIANTS)
    known = {name for stage in stages if stage in VARIANTS for name, _ in VARIANTS[stage]}
    if unknown or (wanted and wanted - known):
        raise UserError(f"unknown --stages {sorted(unknown)} or --variants {sorted((wanted or set()) - known)}; the "
                        f"stages are {sorted(VARIANTS)} and their variants {sorted(known) or '(none)'}")
    check_counts(args, "--warmup", "--steps")
    from diffusion.config import PRESETS as UNET_PRESETS, UNetTrainConfig
    from vae.config import PRESETS as VAE_PRESETS, VAETrainConfig
    configs = {"vae": (VAETrainConfig, VAE_PRESETS), "unet": (UNetTrainConfig, UNET_PRESETS)}
    for stage in stages:  # a misspelt preset stops here, not as every variant's 'failed' record
        build_config(*configs[stage], args.preset, {})
    env = distributed.setup()
    results = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "world_size": env.world_size, "cudnn_benchmark": args.cudnn_benchmark,
               "command": command_line("python -m benchmarks.step_speed"),
               "batch": "the preset's per GPU" if env.world_size > 1 else "the preset's"}
    with cudnn_benchmark(args.cudnn_benchmark):
        for stage in stages:
            for name, overrides in VARIANTS[stage]:
                if wanted is None or name in wanted:
                    results[f"{stage}/{name}"] = timed_variant(stage, name, overrides, args, env)
    distributed.cleanup()
    if args.out and env.is_main:
        write_json(args.out, results)


if __name__ == "__main__":
    run_cli(main)

"""Training throughput: one optimizer step (bf16 autocast forward + loss, backward, fused AdamW) of our
model and of its diffusers twin on the same batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.cases import (LR, Options, Setting, Sizes, fastest, in_format, is_compiled, is_eager, memory_format,
                              run_case, same_precision, speed_ratio)
from benchmarks.measure import measure, release_memory, training_flops
from benchmarks.twins import diffusers_unet, diffusers_vae
from engine.precision import set_low_precision_norms
from unet.model import UNet
from vae.model import AutoencoderKL


@dataclass
class TrainTask:
    """A model, its loss on a batch, and the batch: the same data for both implementations."""

    impl: str
    build: Callable[[], nn.Module]
    loss: Callable[[nn.Module, dict[str, Tensor]], Tensor]
    batch: dict[str, Tensor]
    batch_size: int


def ours_unet_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return F.mse_loss(model(batch["x_t"], batch["t"], batch["context"]).float(), batch["noise"])


def diffusers_unet_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    pred = model(batch["x_t"], batch["t"], encoder_hidden_states=batch["context"], return_dict=False)[0]
    return F.mse_loss(pred.float(), batch["noise"])


def vae_losses(kl_weight: float) -> dict[str, Callable[[nn.Module, dict[str, Tensor]], Tensor]]:
    """L1 reconstruction + KL for both (the discriminator and SSIM of vae.train are not the models' speed)."""

    def ours(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        recon, posterior = model(batch["images"])
        return F.l1_loss(recon.float(), batch["images"]) + kl_weight * posterior.kl().mean()

    def theirs(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        posterior = model.encode(batch["images"], return_dict=False)[0]
        recon = model.decode(posterior.sample(), return_dict=False)[0]
        return F.l1_loss(recon.float(), batch["images"]) + kl_weight * posterior.kl().mean()

    return {"ours": ours, "diffusers": theirs}


def train_step_fn(task: TrainTask, model: nn.Module, setting: Setting, opts: Options) -> Callable[[], None]:
    batch = in_format(task.batch, memory_format(setting))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, fused=opts.device.type == "cuda")

    def forward(b: dict[str, Tensor]) -> Tensor:
        return task.loss(model, b)

    if setting.compile_mode:
        forward = torch.compile(forward, mode=setting.compile_mode, dynamic=False)

    def step() -> None:
        with opts.autocast():
            loss = forward(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def train_flops(task: TrainTask, model: nn.Module, opts: Options) -> int:
    """Model FLOPs of one forward + backward (``measure.training_flops``), the numerator of MFU."""
    def forward() -> None:
        with torch.no_grad(), opts.autocast():
            task.loss(model, task.batch)

    return training_flops(forward)


def implementation_cases(task: TrainTask, compile_modes: list[str], opts: Options) -> tuple[list[dict], int]:
    """Eager in both memory formats (ours also with bf16 norms in the faster one), then each compile mode at the
    fastest eager setting; one model instance, so only this implementation is on the GPU. Returns the rows and
    the FLOPs of one step."""
    torch.manual_seed(0)
    model = task.build().to(opts.device).train()
    flops = train_flops(task, model, opts)

    def case(setting: Setting) -> dict:
        def body() -> dict[str, Any]:
            model.to(memory_format=memory_format(setting))
            set_low_precision_norms(model, setting.low_precision_norms)
            m = measure(train_step_fn(task, model, setting, opts), opts.warmup, opts.iters, opts.device)
            model.zero_grad(set_to_none=True)
            return {"images_per_s": task.batch_size / m.seconds_per_iter, "ms_per_iter": 1e3 * m.seconds_per_iter,
                    "peak_mem_gb": m.peak_mem_gb, "mfu": opts.mfu(flops, m.seconds_per_iter),
                    "first_call_s": m.first_call_s}
        row = run_case(task.impl, setting, body)
        release_memory(opts.device)  # the optimizer state and any compiled graph of this case
        return row

    rows = [case(Setting(channels_last=False)), case(Setting(channels_last=True))]
    channels_last = (fastest(rows, task.impl) or {"channels_last": True})["channels_last"]
    if task.impl == "ours":
        rows.append(case(Setting(channels_last=channels_last, low_precision_norms=True)))
    eager = fastest(rows, task.impl) or {"channels_last": channels_last, "low_precision_norms": False}
    rows += [case(Setting(channels_last=eager["channels_last"], low_precision_norms=eager["low_precision_norms"],
                          compile_mode=mode)) for mode in compile_modes]
    return rows, flops


def train_section(ours: TrainTask, theirs: TrainTask, opts: Options) -> dict[str, Any]:
    """Ours under every compile mode; diffusers under the mode that won for ours."""
    rows, ours_flops = implementation_cases(ours, opts.compile_modes, opts)
    release_memory(opts.device)  # our model is gone before the twin is built
    winner = fastest(rows, "ours", is_compiled)
    winner_mode = winner["compile_mode"] if winner else None
    their_rows, their_flops = implementation_cases(theirs, [winner_mode] if winner_mode else [], opts)
    release_memory(opts.device)
    rows += their_rows
    return {"cases": rows, "flops_per_step": {"ours": ours_flops, "diffusers": their_flops},
            "batch_size": ours.batch_size, "compile_winner": winner_mode,
            # equal treatment: the same settings on both sides (ours' bf16 norms have no diffusers twin)
            "ratios": {"best": speed_ratio(rows, same_precision),
                       "eager": speed_ratio(rows, lambda r: is_eager(r) and same_precision(r)),
                       "compiled": speed_ratio(rows, lambda r: is_compiled(r) and same_precision(r)),
                       # ours at its best against diffusers as shipped (eager; it has no compile by default)
                       "best_vs_diffusers_eager": speed_ratio(rows, theirs_where=is_eager)}}


def unet_tasks(sizes: Sizes, device: torch.device) -> tuple[TrainTask, TrainTask]:
    g = torch.Generator().manual_seed(0)
    b, s, cfg = sizes.unet_batch, sizes.latent_size, sizes.unet
    batch = {"x_t": torch.randn(b, cfg.in_channels, s, s, generator=g),
             "noise": torch.randn(b, cfg.out_channels, s, s, generator=g),
             "t": torch.randint(0, sizes.schedule.num_steps, (b,), generator=g),
             "context": torch.randn(b, sizes.context_length, cfg.context_dim, generator=g)}
    batch = {k: v.to(device) for k, v in batch.items()}
    return (TrainTask("ours", lambda: UNet(cfg), ours_unet_loss, batch, b),
            TrainTask("diffusers", lambda: diffusers_unet(cfg, s), diffusers_unet_loss, batch, b))


def vae_tasks(sizes: Sizes, device: torch.device) -> tuple[TrainTask, TrainTask]:
    g = torch.Generator().manual_seed(0)
    size = sizes.vae_crop
    batch = {"images": (torch.rand(sizes.vae_batch, sizes.vae.in_channels, size, size, generator=g) * 2 - 1).to(device)}
    losses = vae_losses(sizes.kl_weight)
    return (TrainTask("ours", lambda: AutoencoderKL(sizes.vae), losses["ours"], batch, sizes.vae_batch),
            TrainTask("diffusers", lambda: diffusers_vae(sizes.vae), losses["diffusers"], batch, sizes.vae_batch))

"""What every case shares: the sizes (from the stage presets), one setting of a case, run options, and how
rows of results are recorded and compared."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from clip.config import PRESETS as CLIP_PRESETS, CLIPTrainConfig
from diffusion.config import PRESETS as UNET_PRESETS, UNetTrainConfig
from diffusion.schedule import ScheduleConfig
from engine.config import build_config
from engine.precision import inference_autocast
from unet.config import UNetConfig
from vae.config import PRESETS as VAE_PRESETS, VAEConfig, VAETrainConfig

IMPLS = ("ours", "diffusers")
TARGETS = {"unet_train": 1.3, "vae_train": 1.2, "sample": 1.5}  # ours / diffusers, from issue 7
SECTIONS = ("unet_train", "vae_train", "sample")
LR = 1e-4


@dataclass
class Sizes:
    """Shapes of every case, read from the stage presets so the benchmark follows the real configs."""

    unet: UNetConfig
    vae: VAEConfig
    schedule: ScheduleConfig
    prediction_type: str
    context_length: int
    latent_size: int
    unet_batch: int
    vae_crop: int
    vae_batch: int
    kl_weight: float
    sample_batch: int
    guidance_scale: float


def preset_sizes(preset: str, unet_batch: int | None, sample_batch: int) -> Sizes:
    unet_cfg = build_config(UNetTrainConfig, UNET_PRESETS, preset)
    vae_cfg = build_config(VAETrainConfig, VAE_PRESETS, preset)
    clip_cfg = build_config(CLIPTrainConfig, CLIP_PRESETS, preset)
    unet_cfg.model.context_dim = clip_cfg.model.text_width  # what diffusion.train takes from the CLIP stage
    vae_factor = 2 ** (len(vae_cfg.model.channel_mult) - 1)
    return Sizes(unet=unet_cfg.model, vae=vae_cfg.model, schedule=unet_cfg.schedule,
                 prediction_type=unet_cfg.prediction_type, context_length=clip_cfg.model.context_length,
                 latent_size=unet_cfg.resolution // vae_factor, unet_batch=unet_batch or unet_cfg.train.batch_size,
                 vae_crop=vae_cfg.crop_size or vae_cfg.resolution, vae_batch=vae_cfg.train.batch_size,
                 kl_weight=vae_cfg.kl_weight, sample_batch=sample_batch, guidance_scale=unet_cfg.guidance_scale)


@dataclass(frozen=True)
class Setting:
    """One configuration of a case; each optimisation is a field so it can be switched on and off."""

    channels_last: bool = True
    compile_mode: str | None = None
    cuda_graph: bool = False  # sampling: replay one captured UNet call per step
    math_attention: bool = False  # sampling: SDPA's math kernel instead of flash (what flash saves)
    host_sync: bool = False  # sampling: read a value to the host every step (what a sync costs)
    fused_qkv: bool = False  # diffusers sampling: its experimental fuse_qkv_projections()
    # ours: GroupNorm/LayerNorm in bf16 under autocast (engine.precision), as our VAE and UNet stages train and
    # generate; diffusers' norms run in the fp32 that autocast gives them
    low_precision_norms: bool = False

    @property
    def label(self) -> str:
        parts = [f"compiled ({self.compile_mode})" if self.compile_mode else "eager",
                 "channels_last" if self.channels_last else "NCHW"]
        flags = {"cuda_graph": "CUDA graph", "math_attention": "math attention (no flash)",
                 "host_sync": "host sync every step", "fused_qkv": "fused QKV", "low_precision_norms": "bf16 norms"}
        parts += [text for name, text in flags.items() if getattr(self, name)]
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"setting": self.label, **asdict(self)}


@dataclass
class Options:
    device: torch.device
    warmup: int  # training steps before timing; the first of them (compile, cudnn search) is timed alone
    iters: int
    sample_repeats: int  # timed sampling loops, after one warm-up loop
    compile_modes: list[str]
    peak_flops: float | None

    def autocast(self) -> torch.autocast:
        return inference_autocast(self.device)  # the engine's precision: bf16 on CUDA, fp32 elsewhere

    def mfu(self, flops: int | None, seconds: float) -> float | None:
        return flops / seconds / self.peak_flops if flops and self.peak_flops else None


def memory_format(setting: Setting) -> torch.memory_format:
    return torch.channels_last if setting.channels_last else torch.contiguous_format


def in_format(tensors: dict[str, Tensor], fmt: torch.memory_format) -> dict[str, Tensor]:
    return {k: v.contiguous(memory_format=fmt) if v.ndim == 4 else v for k, v in tensors.items()}


def run_case(impl: str, setting: Setting, body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One row of a table; a failing case (out of memory, a compile error) is recorded and the run goes on."""
    row: dict[str, Any] = {"impl": impl, **setting.as_dict()}
    try:
        row.update(body())
        print(f"  {impl:9s} {setting.label:55s} {row['images_per_s']:9.1f} images/s "
              f"(first call {row['first_call_s']:.1f} s)", flush=True)
    except Exception as err:  # noqa: BLE001 - one broken case must not lose the GPU run's other numbers
        row["error"] = f"{type(err).__name__}: {str(err)[:400]}"
        print(f"  {impl:9s} {setting.label:55s} FAILED {row['error']}", flush=True)
    return row


def fastest(rows: list[dict], impl: str, where: Callable[[dict], bool] = lambda row: True) -> dict | None:
    ok = [r for r in rows if r["impl"] == impl and "error" not in r and where(r)]
    return max(ok, key=lambda r: r["images_per_s"]) if ok else None


def speed_ratio(rows: list[dict], where: Callable[[dict], bool] = lambda r: True,
                theirs_where: Callable[[dict], bool] | None = None) -> dict[str, Any] | None:
    """Best ours / best diffusers among the rows that pass the filters (None when either side has none)."""
    ours, theirs = fastest(rows, "ours", where), fastest(rows, "diffusers", theirs_where or where)
    if ours is None or theirs is None:
        return None
    return {"ours_images_per_s": ours["images_per_s"], "diffusers_images_per_s": theirs["images_per_s"],
            "speedup": ours["images_per_s"] / theirs["images_per_s"],
            "ours_setting": ours["setting"], "diffusers_setting": theirs["setting"]}


def same_precision(row: dict) -> bool:
    """A row both implementations have: ours with bf16 norms has no diffusers twin (its norms stay fp32)."""
    return not row["low_precision_norms"]


def is_eager(row: dict) -> bool:
    return row["compile_mode"] is None and not row["cuda_graph"]


def is_compiled(row: dict) -> bool:
    return row["compile_mode"] is not None

"""A run folder of untrained stages at a preset's full size, for timing generation without training first.

    python -m benchmarks.untrained_run --out runs/untrained
    python -m benchmarks.generate_speed --run runs/untrained --out docs/results/bench/generate_speed_h100.json

A generation call does the same work whatever the weights are (the same kernels on the same shapes, the same
CUDA graph), so its images/s can be measured on a GPU that never trained the stack, in seconds instead of a
default run's minutes. The folders are real stage folders (``config.json``, weights, the CLIP's tokenizer), made
from the preset's configs with seeded random weights (none left at zero); their pictures are noise, and
``trained_on`` says so.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from clip import CLIPModel, train_tokenizer
from clip.config import PRESETS as CLIP_PRESETS
from clip.config import CLIPTrainConfig
from diffusion.config import PRESETS as UNET_PRESETS
from diffusion.config import UNetTrainConfig
from engine.config import build_config, config_to_dict
from engine.errors import add_debug_flag, run_cli
from engine.stage import StageError, is_complete
from pipelines.metrics import COLOUR_FAMILIES
from pipelines.prompts import GRID_PROMPTS
from unet import UNet
from vae import AutoencoderKL
from vae.config import PRESETS as VAE_PRESETS
from vae.config import VAETrainConfig

UNTRAINED = {"data": "none: untrained, for timing only"}


def tokenizer_texts() -> list[str]:
    """Prompts in both languages for the tokenizer's merges (fewer than the captions': a smaller vocabulary, which
    changes only the size of the text encoder's embedding lookup)."""
    colours = [f"a {en} pokemon, 一只{zh}的宝可梦" for _, en, zh, _ in COLOUR_FAMILIES]
    return list(GRID_PROMPTS) + colours


def without_zero_layers(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every all-zero weight drawn small and random instead. The UNet's residual branches and its
    output start at zero (their init), so untrained it would predict exactly 0: a replayed CUDA graph or a compiled
    UNet could then differ from eager without any image showing it."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim > 1 and not parameter.any():
                parameter.normal_(0.0, 0.02)
    return model


def write_untrained_run(out: Path, preset: str = "full", seed: int = 0) -> Path:
    """``out/{vae,clip,unet}``: stage folders of the ``preset``'s models with random weights (``seed``)."""
    for name in ("vae", "clip", "unet"):
        if is_complete(out / name):
            raise StageError(f"{out / name} already holds a stage; pick another --out")
    torch.manual_seed(seed)
    vae_cfg = build_config(VAETrainConfig, VAE_PRESETS, preset)
    vae_cfg.model.scaling_factor = 1.0  # measured from data in training; any value times the same decode
    vae = without_zero_layers(AutoencoderKL(vae_cfg.model))
    vae_fingerprint = vae.save(out / "vae", training=config_to_dict(vae_cfg), trained_on=UNTRAINED)

    clip_cfg = build_config(CLIPTrainConfig, CLIP_PRESETS, preset)
    tokenizer = train_tokenizer(tokenizer_texts(), clip_cfg.model.vocab_size, clip_cfg.model.context_length,
                                normalize=clip_cfg.tokenizer_normalize)
    clip_cfg.model.vocab_size = tokenizer.vocab_size
    clip = without_zero_layers(CLIPModel(clip_cfg.model, tokenizer))
    clip_fingerprint = clip.save(out / "clip", training=config_to_dict(clip_cfg), trained_on=UNTRAINED)

    unet_cfg = build_config(UNetTrainConfig, UNET_PRESETS, preset)
    unet_cfg.model = unet_cfg.filled_model(clip.context_dim)
    lineage = {**UNTRAINED, "vae": vae_fingerprint, "clip": clip_fingerprint, "tokenizer": tokenizer.fingerprint}
    unet = without_zero_layers(UNet(unet_cfg.model))
    unet.save(out / "unet", training=config_to_dict(unet_cfg), trained_on=lineage)
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.untrained_run", description=__doc__.split("\n\n")[0])
    add_debug_flag(parser)
    parser.add_argument("--out", type=Path, required=True, help="run folder to write (vae/, clip/, unet/)")
    parser.add_argument("--preset", default="full", help="the stages' preset (default full: the default run's sizes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_untrained_run(args.out, args.preset, args.seed)
    print(f"untrained {args.preset} stages in {out} (for timing only: their pictures are noise)")
    return out


if __name__ == "__main__":
    run_cli(main)

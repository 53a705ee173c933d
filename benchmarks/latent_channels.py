"""How a VAE stage's latent channels carry the images: each channel's mean and spread over the training latents,
its value on the white page, and how far apart the body colours sit in it. Two VAE draws (or two GPU kinds) that
the UNet turns into different colours can be set side by side here, before any UNet trains on them.

On the posterior means of the training images encoded at ``--size`` (512 by default, the UNet stage's), scaled by
the stage's ``scaling_factor`` (as the default, global latent normalisation gives them to the UNet), per channel:
- ``mean`` / ``std``: over every latent element; ``std_all`` over all channels together (about 1: the factor is
  measured on posterior samples, these are their means);
- ``page``: the mean over latent cells whose 8x8 pixels are all near-white (the background the UNet must draw);
- ``by_colour``, per body colour (``diffusion.colour_sentences.body_colours``: the hue family the colour sentence
  names): ``body_mean``, the mean over each image's foreground cells, averaged over the images of that colour;
- ``colour_separation``: the variance of those per-colour means over the colours, divided by the mean variance of
  the images' foreground means within a colour (a Fisher ratio: the larger, the more the channel tells the
  colours apart);
- ``colour_spread_global``: the per-colour means' spread (their standard deviation over the colours), in the
  units of the diffusion's unit noise under the global normalisation, and ``colour_spread_per_channel``: the same
  divided by the channel's ``std``, its units under ``--unet.latent_normalisation=per_channel``.

    python -m benchmarks.latent_channels --vae runs/pokemon/vae --data ../shared/pokemon --out latent_channels.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from data import load_captions
from data.augment import float_batches
from diffusion.colour_sentences import body_colours
from diffusion.latents import encode_moments
from engine.cli import command_line
from engine.errors import add_debug_flag, run_cli
from engine.stage import StageError, read_stage, write_json
from pipelines.metrics import FAMILY_NAMES, WHITE_LEVEL
from vae.model import AutoencoderKL


def foreground_cells(images_uint8: torch.Tensor, factor: int) -> torch.Tensor:
    """Bool ``[N, h, w]`` mask of the latent cells (``factor`` x ``factor`` pixels) holding any foreground pixel
    (not near-white); the others are the page. A batch at a time: a float copy of a whole set is gigabytes."""
    masks = []
    for chunk in images_uint8.split(64):
        foreground = (chunk.float() / 255).amin(dim=1, keepdim=True) < WHITE_LEVEL
        masks.append(F.max_pool2d(foreground.float(), factor)[:, 0] > 0)
    return torch.cat(masks)


def channel_statistics(latents: torch.Tensor, foreground: torch.Tensor, bodies: list[int | None]) -> dict[str, Any]:
    """The per-channel figures of the module docstring for latents ``[N, C, h, w]`` with their foreground cells
    ``[N, h, w]`` (``foreground_cells``) and each image's body colour (an index in ``FAMILY_NAMES``, or None)."""
    channels = latents.shape[1]
    flat = latents.double().transpose(0, 1).flatten(1)  # [C, N*h*w]
    std = flat.std(dim=1, unbiased=False)
    page = ~foreground
    page_cells = latents.double().permute(1, 0, 2, 3)[:, page]  # [C, page cells]
    fg = foreground[:, None].double()
    image_means = (latents.double() * fg).sum(dim=(2, 3)) / fg.sum(dim=(2, 3)).clamp_min(1)  # [N, C]
    has_foreground = foreground.flatten(1).any(dim=1)
    by_colour, within = {}, []
    for family, name in enumerate(FAMILY_NAMES):
        rows = torch.tensor([b == family and bool(f) for b, f in zip(bodies, has_foreground)])
        if rows.sum() < 2:
            continue
        members = image_means[rows]
        by_colour[name] = {"images": int(rows.sum()), "body_mean": members.mean(dim=0).tolist()}
        within.append(members.var(dim=0, unbiased=False))
    result: dict[str, Any] = {
        "channels": channels, "mean": flat.mean(dim=1).tolist(), "std": std.tolist(),
        "std_all": float(flat.std(unbiased=False)), "page": page_cells.mean(dim=1).tolist(),
        "page_cells": int(page.sum()), "by_colour": by_colour,
    }
    if len(by_colour) >= 2:
        colour_means = torch.tensor([entry["body_mean"] for entry in by_colour.values()], dtype=torch.float64)
        between = colour_means.var(dim=0, unbiased=False)
        result["colour_separation"] = (between / torch.stack(within).mean(dim=0)).tolist()
        result["colour_spread_global"] = between.sqrt().tolist()
        result["colour_spread_per_channel"] = (between.sqrt() / std).tolist()
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latent_channels",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", type=Path, required=True, help="a finished VAE stage folder (a run's vae/)")
    parser.add_argument("--data", required=True, help="the captions set (image folder, hub id or 'shapes')")
    parser.add_argument("--size", type=int, default=512, help="the size the images are encoded at (the UNet's: 512)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: GPU when available)")
    parser.add_argument("--out", type=Path, help="write the result here (JSON)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_cli(lambda: measure(args, argv))


def measure(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    info = read_stage(args.vae, "vae")  # a clear error for a folder that holds no finished VAE stage
    factor = info.model.get("scaling_factor")
    if factor is None:
        raise StageError(f"the VAE stage at {args.vae} has no scaling_factor; pass a finished VAE stage")
    data = load_captions(args.data, resolution=args.size)  # checks the folder and size before decoding
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = AutoencoderKL.load(args.vae, device).requires_grad_(False)
    images = data.subset("train").images
    mean, _ = encode_moments(vae, float_batches(images, args.batch_size, device), device)
    latents = (mean * factor).cpu()
    foreground = foreground_cells(images, images.shape[-1] // latents.shape[-1])
    result = {"vae": str(args.vae), "fingerprint": info.fingerprint, "data": args.data, "size": args.size,
              "scaling_factor": factor, "images": len(images),
              **channel_statistics(latents, foreground, body_colours(images)),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "command": command_line("benchmarks.latent_channels", argv)}
    if args.out:
        write_json(args.out, result)
    print(f"{args.vae} ({info.fingerprint}), scaled by {factor:.5f}:")
    for c in range(result["channels"]):
        separation = result.get("colour_separation", [float("nan")] * result["channels"])[c]
        print(f"  channel {c}: mean {result['mean'][c]:+.3f}  std {result['std'][c]:.3f}  page "
              f"{result['page'][c]:+.3f}  colour separation {separation:.2f}")
    return result


if __name__ == "__main__":
    main()

"""How a VAE stage's latent channels carry the images: each channel's mean and spread over the training latents,
its value on the white page, and how far apart the body colours sit in it. Two VAE draws (or two GPU kinds) that
the UNet turns into different colours can be set side by side here, before any UNet trains on them.

On the posterior means of the training images encoded at ``--size`` (512 by default, the UNet stage's), scaled by
the stage's ``scaling_factor`` (as the default, global latent normalisation gives them to the UNet), per channel:
- ``mean`` / ``std``: over every latent element; ``std_all`` over all channels together (about 1: the factor is
  measured on posterior samples, these are their means);
- ``page``: the mean over latent cells whose 8x8 pixels are all near-white (the background the UNet must draw);
- ``by_colour``, per body colour (``diffusion.colour_sentences.body_colours``: the hue family the colour sentence
  names): ``body_mean``, the mean over each image's foreground cells, averaged over the images of that colour, and
  ``body_std``, those image means' spread within the colour;
- ``colour_separation``: the variance of those per-colour means over the colours, divided by the mean variance of
  the images' foreground means within a colour (a Fisher ratio: the larger, the more the channel tells the
  colours apart);
- ``colour_spread_global``: the per-colour means' spread (their standard deviation over the colours), in the
  units of the diffusion's unit noise under the global normalisation, and ``colour_spread_per_channel``: the same
  divided by the channel's ``std``, its units under ``--unet.latent_normalisation=per_channel``;
- ``neighbour_separation``, per pair of neighbouring hue families (``red-orange``, ...): how far apart their
  ``body_mean`` sit in units of their ``body_std`` (over the channels, each difference divided by the two colours'
  root-mean-square spread in that channel): how well an image's body latent tells its colour from the neighbour's
  (the mean distance alone reads alike on two VAEs whose UNets draw red apart from orange or not);
  ``neighbour_separation_pooled``, the same in units of the colours' pooled spread (``pooled_spread``: per channel,
  the root of the within-colour variance ``colour_separation`` divides by), which a reading saved before
  ``body_std`` was recorded gives too: ``--reread`` reads it off saved readings.

And whether the decoder gives the colours back (``reconstructed_colours``, the posterior means decoded), per body
colour of the originals: the share of images whose reconstruction has the same body colour, what the others
became, and the hue shift of the body's pixels, pixel for pixel (a VAE that draws red bodies orange shows here,
whatever a UNet later makes of its latents).

    python -m benchmarks.latent_channels --vae runs/pokemon/vae --data ../shared/pokemon --out latent_channels.json
    python -m benchmarks.latent_channels --reread a/latent_channels.json b/latent_channels.json --out separation.json
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from data import load_captions
from data.augment import float_batches, to_float
from diffusion.colour_sentences import body_colours
from diffusion.latents import encode_moments
from engine.cli import add_result_flags, check_counts, check_output_files, command_line
from engine.distributed import resolve_device
from engine.errors import add_debug_flag, run_cli
from engine.images import to_uint8
from engine.precision import inference_autocast
from engine.stage import StageError, read_stage, write_json
from pipelines.metrics import FAMILY_NAMES, WHITE_LEVEL, in_hue_family, pixel_hues
from vae.model import AutoencoderKL

PROGRAM = "python -m benchmarks.latent_channels"


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
        by_colour[name] = {"images": int(rows.sum()), "body_mean": members.mean(dim=0).tolist(),
                           "body_std": members.std(dim=0, unbiased=False).tolist()}
        within.append(members.var(dim=0, unbiased=False))
    result: dict[str, Any] = {
        "channels": channels, "mean": flat.mean(dim=1).tolist(), "std": std.tolist(),
        "std_all": float(flat.std(unbiased=False)), "page": page_cells.mean(dim=1).tolist(),
        "page_cells": int(page.sum()), "by_colour": by_colour,
    }
    if len(by_colour) >= 2:
        colour_means = torch.tensor([entry["body_mean"] for entry in by_colour.values()], dtype=torch.float64)
        between = colour_means.var(dim=0, unbiased=False)
        pooled_within = torch.stack(within).mean(dim=0)
        result["colour_separation"] = (between / pooled_within).tolist()
        result["colour_spread_global"] = between.sqrt().tolist()
        result["colour_spread_per_channel"] = (between.sqrt() / std).tolist()
        result["neighbour_separation"] = neighbour_separation(by_colour)
        result["neighbour_separation_pooled"] = neighbour_separation(by_colour, pooled_within.sqrt().tolist())
    return result


def neighbour_separation(by_colour: dict[str, dict[str, Any]],
                         spread: Sequence[float] | None = None) -> dict[str, float]:
    """``"a-b" -> distance`` for each pair of neighbouring hue families (``FAMILY_NAMES`` runs round the hue circle)
    that ``by_colour`` both holds: the distance between their ``body_mean`` with each channel's difference divided by
    the two colours' root-mean-square ``body_std`` in that channel, or by ``spread`` (per channel) where given."""
    out = {}
    for index, name in enumerate(FAMILY_NAMES):
        neighbour = FAMILY_NAMES[(index + 1) % len(FAMILY_NAMES)]
        if name in by_colour and neighbour in by_colour:
            a, b = by_colour[name], by_colour[neighbour]
            mean_a, mean_b = torch.tensor(a["body_mean"]), torch.tensor(b["body_mean"])
            if spread is None:
                pair_spread = ((torch.tensor(a["body_std"]) ** 2 + torch.tensor(b["body_std"]) ** 2) / 2).sqrt()
            else:
                pair_spread = torch.tensor(spread)
            out[f"{name}-{neighbour}"] = float(((mean_a - mean_b) / pair_spread.clamp_min(1e-12)).norm())
    return out


def pooled_spread(reading: dict[str, Any]) -> list[float]:
    """Per channel, the root of the colours' mean within-colour variance of the body means (``colour_separation``'s
    denominator), recovered from ``colour_spread_global`` and ``colour_separation``, which every saved reading holds,
    those made before ``body_std`` was recorded too."""
    if "colour_separation" not in reading:
        raise StageError("this latent_channels reading has no colour_separation (fewer than two body colours); "
                         "read a VAE on data with more body colours")
    between = torch.tensor(reading["colour_spread_global"], dtype=torch.float64) ** 2
    ratio = torch.tensor(reading["colour_separation"], dtype=torch.float64)
    # a ratio of 0 (the colours' means equal in that channel) keeps no within-colour variance; an infinite spread
    # makes that channel add nothing to a distance, as its differences are 0
    return torch.where(ratio > 0, (between / ratio).sqrt(), torch.inf).tolist()


def reconstructed_colours(originals: torch.Tensor, reconstructions: torch.Tensor,
                          bodies: list[int | None]) -> dict[str, dict[str, Any]]:
    """Per body colour ``bodies`` of ``originals`` (uint8 ``[N, 3, H, W]``; ``body_colours``), how
    ``reconstructions`` (the same images through the VAE, aligned) keep it: ``images``; ``kept``, the share whose
    reconstruction has the same body colour (its hue family still holds most of the coloured pixels: read it with
    ``chromatic_share``, as a body that fades to grey keeps its few coloured pixels' family); ``became``, the
    others' body colours (``none``: no family holds the body share); ``hue_shift``, the circular mean, over the
    body's pixels (chromatic in the original and in its family, chromatic in the reconstruction), of the
    reconstruction's hue minus the original's, in degrees (+: along red, orange, yellow); ``chromatic_share``, the
    share of the foreground with a hue, in the originals and in the reconstructions. Both pool the pixels of the
    colour's images, so a large body counts more than a small one."""
    rebuilt = body_colours(reconstructions)
    unit_sums, body_pixels, chromatic, foreground = {}, {}, {}, {}  # per image with a body colour
    for start in range(0, len(originals), 64):
        hue, reliable, fg = pixel_hues(to_float(originals[start:start + 64]))
        hue_back, reliable_back, fg_back = pixel_hues(to_float(reconstructions[start:start + 64]))
        for offset, family in enumerate(bodies[start:start + 64]):
            if family is None:
                continue
            i = start + offset
            body = reliable[offset] & reliable_back[offset] & in_hue_family(hue[offset], family)
            shift = torch.deg2rad(hue_back[offset][body] - hue[offset][body])
            unit_sums[i] = (float(shift.sin().sum()), float(shift.cos().sum()))
            body_pixels[i] = int(body.sum())
            chromatic[i] = (int(reliable[offset].sum()), int(reliable_back[offset].sum()))
            foreground[i] = (int(fg[offset].sum()), int(fg_back[offset].sum()))
    result = {}
    for family, name in enumerate(FAMILY_NAMES):
        rows = [i for i, body in enumerate(bodies) if body == family]
        if not rows:
            continue
        became = Counter("none" if rebuilt[i] is None else FAMILY_NAMES[rebuilt[i]]
                         for i in rows if rebuilt[i] != family)
        sin, cos = (sum(unit_sums[i][k] for i in rows) for k in (0, 1))
        coloured, drawn = ([sum(pixels[i][k] for i in rows) for k in (0, 1)] for pixels in (chromatic, foreground))
        result[name] = {"images": len(rows), "kept": sum(rebuilt[i] == family for i in rows) / len(rows),
                        "became": dict(became.most_common()),
                        "hue_shift": math.degrees(math.atan2(sin, cos)) if sum(body_pixels[i] for i in rows) else None,
                        "chromatic_share": [c / max(d, 1) for c, d in zip(coloured, drawn)]}
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=PROGRAM,
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", type=Path, help="a finished VAE stage folder (a run's vae/)")
    parser.add_argument("--data", help="the captions set (image folder, hub id or 'shapes')")
    parser.add_argument("--reread", type=Path, nargs="+", metavar="JSON",
                        help="instead of reading a VAE, read the neighbouring colours' separation off saved readings")
    parser.add_argument("--size", type=int, default=512, help="the size the images are encoded at (the UNet's: 512)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: GPU when available)")
    add_result_flags(parser)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    check_output_files(args, "--out")
    check_counts(args, "--batch-size", "--size")
    return reread(args, argv) if args.reread else measure(args, argv)


def reread(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    """The neighbouring colours' separation of saved readings: in the colours' pooled spread for every reading, in
    each pair's own spread where the reading recorded it."""
    if args.vae or args.data:
        raise StageError("--reread reads saved readings; pass it without --vae and --data")
    loaded = []
    for path in args.reread:  # every file checked before any is read out
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise StageError(f"cannot read {path} as a latent_channels reading ({error}); pass its JSON") from None
        if not isinstance(saved, dict) or "by_colour" not in saved:
            raise StageError(f"{path} is no latent_channels reading (it has no by_colour); pass the JSON "
                             "python -m benchmarks.latent_channels --out wrote")
        loaded.append((path, saved, pooled_spread(saved)))  # a clear error for fewer than two body colours
    readings = []
    for path, saved, spread in loaded:
        pooled = neighbour_separation(saved["by_colour"], spread)
        readings.append({"reading": str(path), "fingerprint": saved.get("fingerprint"), "device": saved.get("device"),
                         "neighbour_separation": saved.get("neighbour_separation"),
                         "neighbour_separation_pooled": pooled})
        recorded = saved.get("neighbour_separation")
        print(f"{path} ({saved.get('fingerprint')}, {saved.get('device')}): apart in the pooled spread "
              f"{_listed(pooled)}; " + (f"in each pair's spread {_listed(recorded)}" if recorded
                                        else "each pair's spread not recorded"))
    result = {"readings": readings, "command": command_line(PROGRAM, argv)}
    if args.out:
        write_json(args.out, result)
    return result


def _listed(separation: dict[str, float]) -> str:
    return ", ".join(f"{pair} {distance:.2f}" for pair, distance in separation.items())


def measure(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    if not (args.vae and args.data):
        raise StageError("pass --vae (a finished VAE stage) and --data (the captions set), or --reread JSON")
    info = read_stage(args.vae, "vae")  # a clear error for a folder that holds no finished VAE stage
    factor = info.model.get("scaling_factor")
    if factor is None:
        raise StageError(f"the VAE stage at {args.vae} has no scaling_factor; pass a finished VAE stage")
    data = load_captions(args.data, resolution=args.size)  # checks the folder and size before decoding
    device = resolve_device(args.device)
    vae = AutoencoderKL.load(args.vae, device).requires_grad_(False)
    images = data.subset("train").images
    mean, _ = encode_moments(vae, float_batches(images, args.batch_size, device), device)
    latents = (mean * factor).cpu()
    foreground = foreground_cells(images, images.shape[-1] // latents.shape[-1])
    with torch.no_grad(), inference_autocast(device):
        reconstructions = torch.cat([to_uint8(vae.decode(batch)) for batch in mean.split(args.batch_size)])
    bodies = body_colours(images)
    result = {"vae": str(args.vae), "fingerprint": info.fingerprint, "data": args.data, "size": args.size,
              "scaling_factor": factor, "images": len(images), **channel_statistics(latents, foreground, bodies),
              "reconstructed_colours": reconstructed_colours(images, reconstructions, bodies),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "command": command_line(PROGRAM, argv)}
    if args.out:
        write_json(args.out, result)
    print(f"{args.vae} ({info.fingerprint}), scaled by {factor:.5f}:")
    for c in range(result["channels"]):
        separation = result.get("colour_separation", [float("nan")] * result["channels"])[c]
        print(f"  channel {c}: mean {result['mean'][c]:+.3f}  std {result['std'][c]:.3f}  page "
              f"{result['page'][c]:+.3f}  colour separation {separation:.2f}")
    for key, spread in (("neighbour_separation", "each pair's"), ("neighbour_separation_pooled", "the pooled")):
        print(f"neighbouring body colours apart, in {spread} spread within a colour: {_listed(result.get(key, {}))}")
    print("reconstructed (body colour kept; what the others became; hue shift of the body's pixels):")
    for name, entry in result["reconstructed_colours"].items():
        shift = "n/a" if entry["hue_shift"] is None else f"{entry['hue_shift']:+.1f} deg"
        print(f"  {name}: {entry['kept']:.0%} of {entry['images']}; {entry['became'] or '-'}; {shift}")
    return result


if __name__ == "__main__":
    run_cli(main)

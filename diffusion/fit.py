"""Whether a UNet fits a VAE and a CLIP stage: the one shape check of training, train_all and loading.

Each side is an architecture config as a dict (what a stage's ``config.json`` holds under ``model``), so
the same check runs on configs before anything trains and on finished stage folders before they load.
"""

from __future__ import annotations

from typing import Any, Mapping

from engine.stage import StageError


def downsample_factor(model: Mapping[str, Any]) -> int:
    """How much a VAE or UNet with this ``channel_mult`` shrinks the side of its input."""
    return 2 ** (len(model["channel_mult"]) - 1)


def check_fit(vae: Mapping[str, Any], clip: Mapping[str, Any], unet: Mapping[str, Any], where: Mapping[str, str],
              resolution: int | None = None) -> None:
    """Raise ``StageError`` naming both sides and the fix when the UNet cannot work with the VAE's latents or
    the CLIP's text states (or, given ``resolution``, with images of that size). ``where`` names each stage."""
    latent = vae["latent_channels"]
    if unet["in_channels"] != latent or unet["out_channels"] != latent:
        raise StageError(f"the VAE {where['vae']} makes {latent}-channel latents but the UNet {where['unet']} takes "
                         f"in_channels={unet['in_channels']}, out_channels={unet['out_channels']}; use a VAE with "
                         "that many latent channels, or train the UNet on this one")
    width = clip["text_width"]
    if unet["context_dim"] != width:
        raise StageError(f"the CLIP stage {where['clip']} gives {width}-wide text states but the UNet {where['unet']} "
                         f"cross-attends to {unet['context_dim']} (model.context_dim); they must match: use a CLIP "
                         "stage of that width, or train the UNet on this one (an unset context_dim takes its width)")
    if resolution is not None:
        factor = downsample_factor(vae) * downsample_factor(unet)
        if resolution % factor:
            raise StageError(f"resolution={resolution} must be a multiple of {factor} (the VAE's downsampling "
                             f"{downsample_factor(vae)} x the UNet's {downsample_factor(unet)})")

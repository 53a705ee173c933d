"""The conditional latent UNet (model only; its training lives in ``diffusion/``)."""

from unet.config import UNetConfig
from unet.model import UNet

__all__ = ["UNet", "UNetConfig"]

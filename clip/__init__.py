"""CLIP stage: byte-level BPE tokenizer plus a contrastive text/image encoder whose per-token text states
condition the UNet."""

from clip.config import PRESETS, CLIPConfig, CLIPTrainConfig
from clip.model import CLIPModel
from clip.tokenizer import BPETokenizer, train_tokenizer

__all__ = ["PRESETS", "CLIPConfig", "CLIPTrainConfig", "CLIPModel", "BPETokenizer", "train_tokenizer"]

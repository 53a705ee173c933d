"""The captions set: local imagefolder / hub / shapes loading, the fixed split, GPU augmentation."""

from .captions import HUB_DATASET, CaptionSet, DataError, language_mask, load_captions, split_indices

__all__ = ["HUB_DATASET", "CaptionSet", "DataError", "language_mask", "load_captions", "split_indices"]

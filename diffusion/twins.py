"""Silhouette twins: training images that share one body plan (``UNetTrainConfig.balance_twins`` draws each with
weight 1 / its group's size), found under the evaluation's silhouette near-copy rule, and how a stage records them."""

from __future__ import annotations

import hashlib

import torch

from data import CaptionSet
from pipelines.metrics import copy_threshold, shrunk, silhouette_thumbnails, twin_groups


def silhouette_twins(data: CaptionSet) -> list[list[int]]:
    """``data``'s training images that share a silhouette (``pipelines.metrics.twin_groups``), under the threshold
    of the evaluation's silhouette near-copy rule (from its validation images), measured at its size."""
    train = shrunk(data.subset("train").images)
    outlines = silhouette_thumbnails(torch.cat([train, train.flip(-1)]))
    return twin_groups(outlines, copy_threshold(outlines, silhouette_thumbnails(shrunk(data.subset("val").images))))


def twins_record(twins: list[list[int]]) -> str:
    """How a stage records its ``silhouette_twins`` (``trained_on["twin_groups"]``): the group sizes, readable, and
    a hash of who is in them, so a change of the grouping rule on the same data reads as other inputs."""
    members = hashlib.sha256(repr(twins).encode()).hexdigest()[:12]
    return f"{','.join(str(len(group)) for group in twins) or 'none'} (members {members})"

"""Shared test set-up: small thread counts and a private data cache per test session."""

import os

import pytest
import torch

# One thread: on small CPU machines (CI has 2 cores) extra threads oversubscribe and slow tiny ops down.
torch.set_num_threads(1)


@pytest.fixture
def other_colour_sentences(monkeypatch):
    """The colour sentences' rule changes (a code change: the same data and settings give other captions)."""
    monkeypatch.setattr("diffusion.colour_sentences.with_colour_sentences",
                        lambda images, en, zh, **kwargs: ([caption + " Drawn." for caption in en], list(zh)))


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    os.environ["SCRATCH_DIFFUSION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield

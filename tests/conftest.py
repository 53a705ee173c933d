"""Shared test set-up: small thread counts and a private data cache per test session."""

import os

import pytest
import torch

# One thread: on small CPU machines (CI has 2 cores) extra threads oversubscribe and slow tiny ops down.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    os.environ["SCRATCH_DIFFUSION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield

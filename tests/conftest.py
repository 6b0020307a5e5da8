"""Shared fixtures: the shared ImageNet sample (skipped when absent) and the default model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def imagenet_sample_dir() -> Path:
    if not (SHARED_SAMPLE / "labels.csv").is_file():
        pytest.skip(f"shared ImageNet sample not found at {SHARED_SAMPLE} (needs ../shared/data beside the repo)")
    return SHARED_SAMPLE


@pytest.fixture(scope="session")
def model():
    from prepdefense import models

    try:
        return models.create("efficientnet-lite0")
    except Exception as e:  # weights package missing in an odd environment
        pytest.skip(f"efficientnet-lite0 unavailable: {e}")


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test, restored afterwards. Tiny models and per-image
    CPU work run faster so: two threads on two cores shared with other work oversubscribe."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def two_threads():
    """Two intra-op torch threads for the test (the multi-worker CPU paths), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)

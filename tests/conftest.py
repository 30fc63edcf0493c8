"""Shared test settings: deterministic, single-threaded torch for stable timings on 2 cores."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield

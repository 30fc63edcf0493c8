"""Shared fixtures of the stage tests: real Fashion-MNIST subsets in ImageNet layout, made once
per session and size (``prepare_fashion_mnist`` reads the IDX files and writes PNGs: seconds each
time). Tests that change a dataset copy it first."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from a2mim.data.fashion_mnist import prepare_fashion_mnist


@pytest.fixture(scope="session")
def fmnist_subset(tmp_path_factory) -> Callable[[int, int], Path]:
    """``get(train_per_class, val_per_class)`` -> the root of that subset (made once); treat it
    as read-only (copy it to change it)."""
    made: dict[tuple[int, int], Path] = {}

    def get(train_per_class: int, val_per_class: int) -> Path:
        key = (train_per_class, val_per_class)
        if key not in made:
            root = tmp_path_factory.mktemp(f"fmnist_{train_per_class}_{val_per_class}") / "fm"
            prepare_fashion_mnist(
                root, train_per_class=train_per_class, val_per_class=val_per_class
            )
            made[key] = root
        return made[key]

    return get


@pytest.fixture(scope="module")
def fmnist(fmnist_subset) -> Path:
    """8 train and 4 validation images per class (80 / 40); modules that need another size
    override ``fmnist`` with ``fmnist_subset(train, val)``."""
    return fmnist_subset(8, 4)

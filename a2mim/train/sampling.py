"""Reproducible data order and augmentation that make mid-epoch resume exact.

The order of epoch ``e`` is a permutation drawn from ``seed`` and ``e`` alone, and each sample's
augmentation is seeded by ``(seed, e, index)``: whatever the number of workers, and wherever a
run stopped, the batches after a restart are the ones an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), stable across runs and machines."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFFFFFFFFFF


def seed_cpu(seed: int) -> None:
    """Seed torch's CPU generator, and only it: what a per-sample augmentation draws from.

    ``torch.manual_seed`` also seeds every CUDA device: eagerly once CUDA is initialised (so a
    per-sample seed in the training process would reset the GPU's generator under the step's
    dropout and drop path), and before that lazily, recording a stack trace per call (0.1-0.5
    ms: seconds per epoch of a toy run, minutes per ImageNet epoch)."""
    torch.default_generator.manual_seed(seed)


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` pairs of one epoch's seeded permutation, from position ``start``.

    With ``world_size > 1`` each rank takes every ``world_size``-th element of the permutation
    (the permutation is truncated to a multiple of ``world_size * batch``).
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        epoch: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        usable: int | None = None,
    ):
        self.num_samples, self.seed, self.epoch = num_samples, seed, epoch
        self.start, self.rank, self.world_size = start, rank, world_size
        self.usable = num_samples if usable is None else usable

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.num_samples, generator=g)[: self.usable]
        return perm[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for idx in self._indices()[self.start :]:
            yield self.epoch, idx

    def __len__(self) -> int:
        return max(0, self.usable // self.world_size - self.start)


class SeededDataset(Dataset):
    """Wraps a dataset whose items are ``(img, target)``; index ``(epoch, i)`` applies
    ``transform`` under a torch seed derived from ``(seed, epoch, i)``."""

    def __init__(self, dataset: Any, transform: Callable, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        img, target = self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            seed_cpu(mix_seed(self.seed, epoch, index))
            return self.transform(img), target

"""The training stream of the ``segment`` stage: augmented crops keyed by ``(epoch, index)``, and the evaluation input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from a2mim.config import bounded
from a2mim.data.ade import ADE20KSegmentation
from a2mim.data.seg_transforms import SegTrainTransform, eval_input
from a2mim.train.sampling import mix_seed


@dataclass(frozen=True)
class DataConfig:
    """An ADE20K-layout folder (`a2mim.data.ade`) and mmseg's pipeline (`a2mim.data.seg_transforms`;
    ``img_scale`` is ``(long, short)``, also the test size). The label convention is explicit
    and checked against a sample of the label files before training (`a2mim.data.ade.validate_root`):
    ``reduce_zero_label: true`` (ADE20K; the toy scenes too, with ``num_classes: 11``): raw 0 is
    ignored and 1..K are the classes; ``false``: raw 0..K-1 are the classes and ``ignore_index``
    is void. ``num_classes`` is K."""

    root: str = "data/ade20k/ADEChallengeData2016"
    split: str = "training"
    val_split: str = "validation"
    num_classes: int = bounded(150, ge=1, le=254)
    reduce_zero_label: bool = True
    ignore_index: int = bounded(255, ge=1, le=255)
    img_scale: tuple[int, int] = bounded((2048, 512), ge=1)
    ratio_range: tuple[float, float] = bounded((0.5, 2.0), gt=0)
    crop_size: int = bounded(512, ge=1)
    cat_max_ratio: float = bounded(0.75, gt=0, le=1)
    hflip: float = bounded(0.5, ge=0, le=1)
    photometric: bool = True
    num_workers: int = bounded(4, ge=0)


class StreamSampler(Sampler[tuple[int, int]]):
    """Keys ``(epoch, index)`` of the training stream, for steps ``[start, stop)``.

    The stream visits the images in a permutation drawn from ``(seed, epoch)``, epoch after
    epoch, without a gap at epoch ends (mmseg's infinite sampler); step ``s`` takes stream
    positions ``s * global_batch .. + global_batch`` and rank ``r`` its rows ``r, r + world, ...``.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        batch_size: int,
        start: int,
        stop: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.num_samples, self.seed, self.batch_size = num_samples, seed, batch_size
        self.start, self.stop, self.rank, self.world_size = start, stop, rank, world_size
        self._perm: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(self.num_samples, generator=gen).tolist())
        return self._perm[1]

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        for step in range(self.start, self.stop):
            for row in range(self.batch_size):
                position = step * global_batch + row * self.world_size + self.rank
                epoch, pos = divmod(position, self.num_samples)
                yield epoch, self._order(epoch)[pos]

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.batch_size


class AugmentedSegSet(Dataset):
    """Key ``(epoch, index)`` -> the training transform of item ``index`` with a numpy
    generator seeded from ``(seed, epoch, index)``."""

    def __init__(self, dataset: ADE20KSegmentation, transform: SegTrainTransform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        img_chw, label_hw = self.dataset[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        return self.transform(img_chw, label_hw, rng)


@dataclass(frozen=True)
class TestInput:
    """Dataset transform for evaluation: the test-size, normalised image and the label as is."""

    img_scale: tuple[int, int]

    def __call__(self, img_chw: torch.Tensor, label_hw: torch.Tensor):
        return eval_input(img_chw, self.img_scale), label_hw

"""Precise BatchNorm statistics (detectron2's ``PreciseBN`` hook, MoCo's ``TEST.PRECISE_BN``).

During training, BatchNorm's running mean and variance are exponential averages over the last
few hundred mini-batches of 2 images, taken while the weights moved. Before evaluation, MoCo's
detection protocol recomputes them with the final weights: ``NUM_ITER`` (200) forward passes in
training mode, each BatchNorm's running statistics set to the plain average of the per-batch
mean and variance (fvcore ``update_bn_stats``). `update_bn_stats` does the same for any model
whose forward takes the items the caller feeds it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["trainable_batchnorms", "update_bn_stats"]


def trainable_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers (SyncBatchNorm included) that track running statistics; torchvision's
    ``FrozenBatchNorm2d`` is not one of them."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@torch.no_grad()
def update_bn_stats(
    model: nn.Module, batches: Iterable[Any], num_iter: int, forward: Callable[[Any], Any]
) -> int:
    """Recompute the running statistics of every BatchNorm of ``model`` over ``num_iter``
    batches: ``forward(batch)`` is called in training mode (no gradients) and each layer's
    running mean / variance become the averages of the batch means / variances it saw.
    Returns the number of batches used (fewer when ``batches`` runs out). The model's training
    mode and the layers' momenta are restored."""
    bns = trainable_batchnorms(model)
    if not bns or num_iter < 1:
        return 0
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    means = [torch.zeros_like(bn.running_mean) for bn in bns]
    variances = [torch.zeros_like(bn.running_var) for bn in bns]
    for bn in bns:
        bn.momentum = 1.0  # the running statistics become those of the last batch
    model.train()
    used = 0
    try:
        for batch in batches:
            if used == num_iter:
                break
            forward(batch)
            used += 1
            for bn, mean, var in zip(bns, means, variances, strict=True):
                mean += (bn.running_mean - mean) / used
                var += (bn.running_var - var) / used
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        model.train(was_training)
    if used:
        for bn, mean, var in zip(bns, means, variances, strict=True):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    return used

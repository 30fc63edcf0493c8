"""Occlusion robustness (A2MIM Sec. 3.1, Fig. 1 a-d; appendix B.1).

An image is cut into ``patch_size`` squares; ``round(n_patches * r)`` of them are dropped, i.e. set
to 0 in normalised space (the dataset mean colour), and top-1 accuracy is measured for each
occlusion ratio ``r``. ``round`` is Python's (halves to even): 196 patches at ``r = 0.1`` drop 20.

Random patch sets: by default every image draws its own set (``per_image=True``), which averages
over many occlusion patterns per batch. The reference tool draws one set per batch and applies it
to every image of that batch (``per_image=False``); its result then depends on the batch size.
Each ratio has its own ``torch.Generator`` seeded from ``(seed, ratio)`` (see
:func:`ratio_generator`) and consumed batch after batch, so a result is reproducible for the same
data order and batch size and does not depend on which other ratios are evaluated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import Tensor, nn

DEFAULT_OCCLUSION_RATIOS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""Occlusion ratios of the paper's Fig. 1 (1.0, an all-mean image, is also accepted)."""

Batches = tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]]


def ratio_generator(seed: int, ratio: float) -> torch.Generator:
    """The CPU generator used for occlusion ratio ``ratio`` (independent of the other ratios)."""
    digest = hashlib.sha256(f"a2mim-occlusion:{seed}:{ratio!r}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def occlusion_masks(
    n_images: int,
    grid_hw: tuple[int, int],
    n_dropped: int,
    *,
    per_image: bool,
    generator: torch.Generator,
) -> Tensor:
    """Draw which patches to drop.

    Args:
        n_images: B.
        grid_hw: patches per column and per row ``(gh, gw)``.
        n_dropped: patches dropped per image, in ``[0, gh * gw]``.
        per_image: one random set per image (True) or one set shared by the batch (False).
        generator: CPU generator to draw from.

    Returns:
        (B, gh, gw) bool, True = dropped, exactly ``n_dropped`` True per image.
    """
    n_patches = grid_hw[0] * grid_hw[1]
    if not 0 <= n_dropped <= n_patches:
        raise ValueError(f"n_dropped={n_dropped} must lie in [0, {n_patches}]")
    n_draws = n_images if per_image else 1
    order_dn = torch.rand(n_draws, n_patches, generator=generator).argsort(dim=1)
    drop_dn = torch.zeros(n_draws, n_patches, dtype=torch.bool)
    drop_dn.scatter_(1, order_dn[:, :n_dropped], True)
    return drop_dn.expand(n_images, n_patches).reshape(n_images, *grid_hw)


def occlude(img_bchw: Tensor, drop_bhw: Tensor, patch_size: int) -> Tensor:
    """Set the dropped patches to 0.

    Args:
        img_bchw: (B, C, H, W) normalised images.
        drop_bhw: (B, H / patch_size, W / patch_size) bool, True = dropped.
        patch_size: patch side in pixels.

    Returns:
        (B, C, H, W) occluded copy.
    """
    keep_b1hw = ~drop_bhw.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    return img_bchw * keep_b1hw[:, None].to(img_bchw.dtype)


def occlusion_accuracy(
    model: nn.Module,
    data: Batches,
    ratios: Iterable[float] = DEFAULT_OCCLUSION_RATIOS,
    patch_size: int = 16,
    per_image: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[float, float]:
    """Top-1 accuracy under random patch occlusion.

    Args:
        model: classifier, (B, 3, H, W) normalised images -> (B, K) logits, already on ``device``.
            It runs in eval mode for the call (its previous mode is restored).
        data: one ``(images_bchw, labels_b)`` pair of tensors, or an iterable of such batches
            (e.g. a DataLoader); it is iterated once. H and W must be multiples of ``patch_size``.
        ratios: occlusion ratios in [0, 1]; ``round(n_patches * r)`` patches are dropped.
        patch_size: patch side in pixels (16 at 224 px; e.g. 4 for 28 or 32 px inputs).
        per_image: independent patch set per image (default) or one per batch (reference tool).
        seed: base seed, see :func:`ratio_generator`.
        device: where the forward passes run.

    Returns:
        ``{ratio: top-1 accuracy in percent}`` in the order of ``ratios``.
    """
    ratios = tuple(ratios)
    if any(not 0.0 <= r <= 1.0 for r in ratios):
        raise ValueError(f"ratios={ratios}: every occlusion ratio must lie in [0, 1]")
    if patch_size < 1:
        raise ValueError(f"patch_size={patch_size}: must be >= 1")
    generators = {r: ratio_generator(seed, r) for r in ratios}
    correct = dict.fromkeys(ratios, 0)
    n_seen = 0

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for img_bchw, labels_b in _batches(data):
                _, _, height, width = img_bchw.shape
                if height % patch_size or width % patch_size:
                    raise ValueError(
                        f"image size {height}x{width} is not a multiple of "
                        f"patch_size={patch_size}; choose a patch size that divides both sides"
                    )
                grid_hw = (height // patch_size, width // patch_size)
                img_bchw, labels_b = img_bchw.to(device), labels_b.to(device)
                for ratio in ratios:
                    n_dropped = round(grid_hw[0] * grid_hw[1] * ratio)
                    drop_bhw = occlusion_masks(
                        len(img_bchw),
                        grid_hw,
                        n_dropped,
                        per_image=per_image,
                        generator=generators[ratio],
                    )
                    logits_bk = model(occlude(img_bchw, drop_bhw.to(device), patch_size))
                    correct[ratio] += int((logits_bk.argmax(dim=1) == labels_b).sum())
                n_seen += len(img_bchw)
    finally:
        model.train(was_training)
    if n_seen == 0:
        raise ValueError("occlusion_accuracy got no images; check the data loader")
    return {ratio: 100.0 * correct[ratio] / n_seen for ratio in ratios}


def _batches(data: Batches) -> Iterable[tuple[Tensor, Tensor]]:
    """Accept one (images, labels) pair of tensors or an iterable of batches."""
    if (
        isinstance(data, tuple | list)
        and len(data) == 2
        and all(isinstance(item, Tensor) for item in data)
    ):
        data = [data]
    for batch in data:
        img_bchw, labels_b = batch[0], batch[1]
        if img_bchw.ndim != 4 or labels_b.shape != img_bchw.shape[:1]:
            raise ValueError(
                "each batch must be (images (B, C, H, W), labels (B,)), got shapes "
                f"{tuple(img_bchw.shape)} and {tuple(labels_b.shape)}"
            )
        yield img_bchw, labels_b

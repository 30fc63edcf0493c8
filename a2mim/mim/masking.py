"""Block masking (SimMIM / A²MIM style) and the masked-input fill.

Convention everywhere: True = masked. A cell mask ``(B, g, g)`` lives on a grid of
``input_size / mask_patch_size`` cells; it is upsampled (nearest) to any feature resolution and
to pixels by integer repetition, as views where possible.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

FillMode = Literal["mean", "zero", "none"]


class BlockMaskGenerator:
    """Draws exactly ``ceil(cells * mask_ratio)`` masked cells per image, uniformly without
    replacement, on a ``(input_size / mask_patch_size)^2`` grid.

    224 px with 32 px cells and ratio 0.6 gives a 7x7 grid with exactly 30 masked cells
    (real ratio 0.612), as in the reference code.
    """

    def __init__(self, input_size: int, mask_patch_size: int, mask_ratio: float):
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}; the paper uses 0.6")
        if mask_patch_size <= 0 or input_size % mask_patch_size:
            raise ValueError(
                f"input size {input_size} is not divisible by mask_patch_size "
                f"{mask_patch_size}; choose a mask_patch_size that divides the input size "
                f"(e.g. 32 for 224 px)"
            )
        self.input_size = input_size
        self.mask_patch_size = mask_patch_size
        self.mask_ratio = mask_ratio
        self.grid = input_size // mask_patch_size
        self.num_cells = self.grid * self.grid
        # round() guards against float noise such as 0.7 * 10 = 7.000000000000001.
        self.num_masked = math.ceil(round(self.num_cells * mask_ratio, 9))

    def __call__(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """A bool cell mask ``(B, g, g)`` with exactly ``num_masked`` True cells per image.

        The draw happens on the generator's device (CPU by default) so that a seeded generator
        gives the same masks on every machine; the result is then moved to ``device``.
        """
        gen_device = generator.device if generator is not None else torch.device("cpu")
        noise_bn = torch.rand(batch_size, self.num_cells, generator=generator, device=gen_device)
        masked_idx = noise_bn.argsort(dim=1)[:, : self.num_masked]
        mask_bn = torch.zeros(batch_size, self.num_cells, dtype=torch.bool, device=gen_device)
        mask_bn.scatter_(1, masked_idx, True)
        return mask_bn.view(batch_size, self.grid, self.grid).to(device or gen_device)


def upsample_mask(mask_bgg: torch.Tensor, scale: int) -> torch.Tensor:
    """Nearest upsampling of a cell mask ``(B, g, g)`` by an integer factor -> ``(B, gs, gs)``."""
    if scale == 1:
        return mask_bgg
    b, gh, gw = mask_bgg.shape
    return (
        mask_bgg[:, :, None, :, None]
        .expand(b, gh, scale, gw, scale)
        .reshape(b, gh * scale, gw * scale)
    )


def mask_scale(mask_patch_size: int, stride: int, where: str) -> int:
    """How many feature cells one mask cell spans at a layer of the given stride.

    Raises a clear error when the mask cell does not cover a whole number of feature cells.
    """
    if mask_patch_size % stride:
        raise ValueError(
            f"mask_patch_size {mask_patch_size} is not a multiple of the stride {stride} at "
            f"{where}; use a mask_patch_size that is a multiple of {stride} or apply the token "
            f"at an earlier point"
        )
    return mask_patch_size // stride


def fill_masked(
    img_bchw: torch.Tensor, mask_b1hw: torch.Tensor, mode: FillMode = "mean"
) -> torch.Tensor:
    """The encoder input: masked pixels set to each image's own per-channel mean (``"mean"``,
    A²MIM's "RGB mean" of the normalised image, masked area included), to 0 (``"zero"``,
    ablation) or left untouched (``"none"``, SimMIM)."""
    if mode == "none":
        return img_bchw
    if mode == "zero":
        return img_bchw.masked_fill(mask_b1hw, 0.0)
    if mode == "mean":
        return torch.where(mask_b1hw, img_bchw.mean(dim=(2, 3), keepdim=True), img_bchw)
    raise ValueError(f"unknown fill mode {mode!r}; use 'mean', 'zero' or 'none'")

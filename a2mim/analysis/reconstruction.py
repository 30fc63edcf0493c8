"""Reconstruction figures (paper Fig. 5 / A2 / A3): input, masked input, prediction, and the
prediction pasted into the visible pixels."""

from __future__ import annotations

from pathlib import Path

import torch

from a2mim.atomic import atomic_path
from a2mim.data.transforms import denormalize


def reconstruction_panels(
    img_bchw: torch.Tensor, pred_bchw: torch.Tensor, mask_bhw: torch.Tensor, fill_bchw=None
) -> dict[str, torch.Tensor]:
    """The four panels in [0, 1]: ``input``, ``masked`` (what the encoder saw, or grey where
    masked), ``prediction``, ``pasted`` (visible pixels from the input, masked ones predicted)."""
    m = mask_bhw[:, None].to(img_bchw.dtype)
    shown = fill_bchw if fill_bchw is not None else img_bchw * (1 - m)
    pasted = img_bchw * (1 - m) + pred_bchw.to(img_bchw.dtype) * m
    return {
        "input": denormalize(img_bchw),
        "masked": denormalize(shown),
        "prediction": denormalize(pred_bchw.to(img_bchw.dtype)),
        "pasted": denormalize(pasted),
    }


def save_reconstruction_figure(
    panels: dict[str, torch.Tensor], path: str | Path, title: str = "", max_images: int = 8
) -> Path:
    """A grid (one row per image, one column per panel) saved as PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(panels)
    n = min(max_images, next(iter(panels.values())).shape[0])
    fig, axes = plt.subplots(n, len(names), figsize=(1.6 * len(names), 1.6 * n), squeeze=False)
    for row in range(n):
        for col, name in enumerate(names):
            ax = axes[row][col]
            ax.imshow(panels[name][row].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path

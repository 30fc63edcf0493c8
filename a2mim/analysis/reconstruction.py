"""Reconstruction figures (paper Fig. 5 / A2 / A3): input, masked input, prediction, and the
prediction pasted into the visible pixels; the fixed figure batch pre-training draws every
epoch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from a2mim.atomic import atomic_path
from a2mim.config import ImageFolderData
from a2mim.data.imagefolder import ImageFolderDataset
from a2mim.data.transforms import denormalize, eval_transform
from a2mim.mim.masking import fill_masked, upsample_mask
from a2mim.train.sampling import mix_seed

if TYPE_CHECKING:
    from a2mim.mim.model import MaskedImageModel


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


class Reconstruction(NamedTuple):
    """What a masked image model makes of a batch of images under given masks.

    Attributes:
        panels: :func:`reconstruction_panels` of the batch (``input``, ``masked``,
            ``prediction``, ``pasted``), each (B, 3, H, W) in [0, 1], on the CPU.
        loss: the model's own training loss on this batch and these masks.
        masked_l1_b: (B,) mean absolute error of the prediction over each image's masked pixels,
            in normalised image space (the quantity A²MIM's spatial loss is built on).
    """

    panels: dict[str, torch.Tensor]
    loss: float
    masked_l1_b: torch.Tensor


@torch.no_grad()
def reconstruct(
    model: MaskedImageModel, img_bchw: torch.Tensor, mask_bgg: torch.Tensor
) -> Reconstruction:
    """Run ``model`` (in eval mode, restored afterwards) on fixed images and cell masks.

    The ``masked`` panel shows what the encoder saw: the filled input for methods that fill
    the masked pixels (A²MIM's RGB mean, SimMIM+ for CNNs), the image with masked pixels at 0
    in normalised space (the mean colour) for methods that leave the input untouched.

    Args:
        model: a :class:`~a2mim.mim.model.MaskedImageModel`.
        img_bchw: (B, 3, H, W) normalised images, H = W = the model's ``img_size``.
        mask_bgg: (B, g, g) bool cell mask, True = masked (``model.masker`` draws one).

    Returns:
        :class:`Reconstruction`.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = model(img_bchw.to(device), mask_bgg.to(device))
    finally:
        model.train(was_training)
    img_bchw = img_bchw.float().cpu()
    pred_bchw = out.pred_bchw.float().cpu()
    mask_b1hw = upsample_mask(mask_bgg.cpu(), model.cfg.mask_patch_size)[:, None]
    shown = None if model.cfg.fill == "none" else fill_masked(img_bchw, mask_b1hw, model.cfg.fill)
    weight_b1hw = mask_b1hw.float()
    abs_err_b = ((pred_bchw - img_bchw).abs() * weight_b1hw).sum(dim=(1, 2, 3))
    n_masked_b = weight_b1hw.sum(dim=(1, 2, 3)) * img_bchw.shape[1]
    return Reconstruction(
        panels=reconstruction_panels(img_bchw, pred_bchw, mask_b1hw[:, 0], shown),
        loss=float(out.loss),
        masked_l1_b=abs_err_b / n_masked_b.clamp(min=1),
    )


def save_reconstruction_rows(
    rows: Sequence[tuple[str, dict[str, torch.Tensor]]],
    paths: Sequence[str | Path],
    title: str = "",
    image_names: Sequence[str] | None = None,
) -> list[Path]:
    """One row per model, and per image its panels side by side (paper Fig. 5), saved to every
    path in ``paths`` (the format follows the suffix: ``.png``, ``.svg``), each atomically.

    Args:
        rows: ``(row label, panels)`` per model; all rows hold the same panels for the same
            number of images.
        paths: output files.
        title: figure title.
        image_names: a short name per image for the column titles (default ``img 0``, ...).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows[0][1])
    n_images = next(iter(rows[0][1].values())).shape[0]
    image_names = list(image_names or [f"img {k}" for k in range(n_images)])
    n_cols = n_images * len(names)
    fig, axes = plt.subplots(
        len(rows), n_cols, figsize=(1.3 * n_cols + 1.2, 1.4 * len(rows) + 0.6), squeeze=False
    )
    for row, (label, panels) in enumerate(rows):
        for image in range(n_images):
            for k, name in enumerate(names):
                ax = axes[row][image * len(names) + k]
                ax.imshow(panels[name][image].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"{image_names[image]}\n{name}", fontsize=7)
        axes[row][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        return [save_figure(fig, Path(path)) for path in paths]
    finally:
        plt.close(fig)


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure atomically; no timestamps in SVG, so reruns give equal files."""
    fmt = path.suffix.lstrip(".") or "png"
    metadata = {"Date": None} if fmt == "svg" else None
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format=fmt, metadata=metadata)
    return path


def figure_batch(data: ImageFolderData, img_size: int, figure_images: int, seed: int):
    """Fixed validation images and masks for reconstruction figures (same every epoch)."""
    root = Path(data.root)
    split = data.val_split if (root / data.val_split).is_dir() else data.split
    ds = ImageFolderDataset(
        root,
        split,
        transform=eval_transform(img_size, 1.0),
        on_corrupt=data.on_corrupt,
    )
    step = max(1, len(ds) // figure_images)
    # at most the split's images (a split smaller than figure_images gives them all)
    picks = range(0, min(len(ds), step * figure_images), step)
    imgs = torch.stack([ds[i][0] for i in picks])
    gen = torch.Generator().manual_seed(mix_seed(seed, 3))
    return imgs, gen.get_state()


@torch.no_grad()
def save_training_figure(model: MaskedImageModel, fig_batch, path: Path, preset: str) -> None:
    """The reconstructions of `figure_batch` by ``model`` (a pre-training run's, mid-run)."""
    imgs, gen_state = fig_batch
    device = next(model.parameters()).device
    model.eval()
    gen = torch.Generator()
    gen.set_state(gen_state)
    mask = model.masker(imgs.shape[0], generator=gen)
    out = model(imgs.to(device), mask.to(device))
    mask_pix = upsample_mask(mask, model.cfg.mask_patch_size)[:, None]
    filled = fill_masked(imgs, mask_pix, model.cfg.fill)
    shown = filled if model.cfg.fill != "none" else None
    panels = reconstruction_panels(imgs, out.pred_bchw.float().cpu(), mask_pix[:, 0], shown)
    title = f"{preset} - {path.stem} - loss {out.loss.item():.4f}"
    save_reconstruction_figure(panels, path, title=title)

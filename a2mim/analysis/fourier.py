"""Fourier and variance analysis of feature maps (Park & Kim, ICLR 2022; A2MIM Sec. 3.3, Fig. 3).

For a feature map ``z`` of shape (B, C, h, h) the log amplitude ``log(|fft2(z)| + 1e-6)`` is
fft-shifted (zero frequency in the centre), averaged over batch and channels, and read along the
diagonal from the centre outwards; subtracting the value at zero frequency gives the *relative*
log amplitude ``Delta log A(w)``. The "high-frequency" number of the paper is its value at the
largest diagonal frequency, ``w = pi`` for even ``h``.

Reading the diagonal: after ``fftshift`` the centre ``c = h // 2`` holds frequency 0 and index
``c - k`` holds frequency ``-2 pi k / h`` on both axes. We walk from the centre towards index 0,
so for even ``h`` the profile covers ``0, 2 pi / h, ..., pi`` and ends exactly at the Nyquist
frequency ``(pi, pi)``; for odd ``h`` it ends at ``(h - 1) pi / h``. For real feature maps
``|F(-w, -w)| = |F(w, w)|``, so this equals reading towards the other corner. (Park & Kim's code
walks the other way, stops one bin short of ``pi`` for even ``h`` and labels its axis 0..pi.)

Feature variance is the unbiased variance over the spatial positions, averaged over batch and
channels (as in Park & Kim's code).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

LOG_EPS = 1e-6
"""Added to the amplitude before the log."""


class AmplitudeProfile(NamedTuple):
    """Relative log amplitude along the diagonal of the spectrum.

    Attributes:
        frequency_l: (L,) normalised angular frequency (radians per sample), 0 .. pi.
        delta_log_amplitude_l: (L,) log amplitude minus its value at frequency 0.
    """

    frequency_l: Tensor
    delta_log_amplitude_l: Tensor


def default_block_names(model: nn.Module) -> list[str]:
    """Modules whose outputs are analysed, in depth order.

    timm ResNets: the stem (``maxpool``, the stem's output) and every block of ``layer1`` ..
    ``layer4``; timm ViTs (and any model with a ``blocks`` sequence): ``blocks.0`` ..
    ``blocks.L-1``.
    Other models: pass the module names explicitly.
    """
    stages = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(stage, nn.Sequential) for stage in stages) and hasattr(model, "maxpool"):
        return ["maxpool"] + [
            f"layer{i}.{name}"
            for i, stage in enumerate(stages, start=1)
            for name, _ in stage.named_children()
        ]
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList):
        return [f"blocks.{i}" for i in range(len(blocks))]
    raise ValueError(
        f"no default block list for {type(model).__name__} (neither a timm ResNet with "
        "layer1..layer4 nor a model with `blocks`); pass module names explicitly"
    )


def block_features(model: nn.Module, module_names: Sequence[str], img_bchw: Tensor) -> list[Tensor]:
    """Outputs of the named modules for one batch, as (B, C, h, w) maps.

    Forward hooks are registered for the duration of one forward pass and removed afterwards.
    Token outputs (B, N, C) of models with a ``patch_embed`` lose their ``num_prefix_tokens``
    (class / register tokens) and are reshaped to the patch grid; NHWC outputs of models with
    ``output_fmt == "NHWC"`` (timm Swin) are permuted to NCHW.

    Args:
        model: the network; it runs in eval mode without gradients (previous mode restored).
        module_names: names from ``model.named_modules()``.
        img_bchw: (B, 3, H, W) normalised images on the model's device.

    Returns:
        One detached (B, C, h, w) tensor per name, in the order of ``module_names``.
    """
    modules = dict(model.named_modules())
    missing = [name for name in module_names if name not in modules]
    if missing:
        raise KeyError(
            f"modules {missing} are not in {type(model).__name__}; valid names include "
            f"{list(modules)[1:12]} (see model.named_modules())"
        )
    captured: dict[str, Tensor] = {}

    def hook_for(name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            tensor = output[0] if isinstance(output, tuple | list) else output
            captured[name] = tensor.detach().clone()  # later in-place ops must not change it

        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in module_names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(img_bchw)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [_to_map(model, name, captured[name], img_bchw.shape[-2:]) for name in module_names]


def relative_log_amplitude(feat_bchw: Tensor) -> AmplitudeProfile:
    """Diagonal profile of the batch- and channel-averaged log amplitude, relative to frequency 0.

    Args:
        feat_bchw: (B, C, h, h) feature maps (square); computed in float64 if given float64,
            else in float32.

    Returns:
        :class:`AmplitudeProfile` with ``L = h // 2 + 1`` points.
    """
    if feat_bchw.ndim != 4 or feat_bchw.shape[-1] != feat_bchw.shape[-2]:
        raise ValueError(
            f"expected square (B, C, h, h) feature maps, got shape {tuple(feat_bchw.shape)}"
        )
    if feat_bchw.dtype != torch.float64:
        feat_bchw = feat_bchw.float()
    size = feat_bchw.shape[-1]
    log_amplitude_hw = (torch.fft.fft2(feat_bchw).abs() + LOG_EPS).log().mean(dim=(0, 1))
    diagonal = torch.fft.fftshift(log_amplitude_hw).diagonal()
    profile_l = diagonal[: size // 2 + 1].flip(0)  # centre (frequency 0) towards (-pi, -pi)
    frequency_l = 2 * math.pi * torch.arange(len(profile_l), dtype=profile_l.dtype) / size
    return AmplitudeProfile(frequency_l.to(profile_l.device), profile_l - profile_l[0])


def high_frequency_delta(feat_bchw: Tensor) -> float:
    """``Delta log A`` at the highest diagonal frequency (``pi`` for even sizes)."""
    return float(relative_log_amplitude(feat_bchw).delta_log_amplitude_l[-1])


def feature_variance(feat_bchw: Tensor) -> float:
    """Unbiased variance over (h, w), averaged over batch and channels; needs h * w >= 2."""
    if feat_bchw.ndim != 4 or feat_bchw.shape[-1] * feat_bchw.shape[-2] < 2:
        raise ValueError(
            f"expected (B, C, h, w) maps with h * w >= 2, got shape {tuple(feat_bchw.shape)}; "
            "a 1 x 1 map has no spatial variance (feed larger images)"
        )
    return float(feat_bchw.double().var(dim=(-2, -1)).mean())


def fourier_profile(
    model: nn.Module, module_names: Sequence[str], img_bchw: Tensor
) -> list[dict[str, float | str]]:
    """High-frequency ``Delta log A`` and variance of every named block's output.

    Returns:
        One dict per module: ``name``, ``depth`` (index / (count - 1), 0 .. 1),
        ``delta_log_amp_pi`` (:func:`high_frequency_delta`) and ``variance``
        (:func:`feature_variance`).
    """
    features = block_features(model, module_names, img_bchw)
    last = max(len(features) - 1, 1)
    return [
        {
            "name": name,
            "depth": index / last,
            "delta_log_amp_pi": high_frequency_delta(feat_bchw),
            "variance": feature_variance(feat_bchw),
        }
        for index, (name, feat_bchw) in enumerate(zip(module_names, features, strict=True))
    ]


def _to_map(model: nn.Module, name: str, output: Tensor, image_hw: torch.Size) -> Tensor:
    """(B, C, h, w) view of one captured module output."""
    if output.ndim == 4:
        if getattr(model, "output_fmt", "NCHW") == "NHWC":
            return output.permute(0, 3, 1, 2)
        return output
    patch_embed = getattr(model, "patch_embed", None)
    if output.ndim != 3 or patch_embed is None:
        raise ValueError(
            f"output of {name!r} has shape {tuple(output.shape)}; only (B, C, h, w) maps, or "
            "(B, N, C) tokens of models with a `patch_embed`, can be analysed"
        )
    n_prefix = getattr(model, "num_prefix_tokens", 1 if hasattr(model, "cls_token") else 0)
    tokens_bnc = output[:, n_prefix:]
    n_tokens = tokens_bnc.shape[1]
    grid_hw = tuple(getattr(patch_embed, "grid_size", ()) or ())
    if math.prod(grid_hw) != n_tokens or len(grid_hw) != 2:
        patch_hw = getattr(patch_embed, "patch_size", None)
        if patch_hw is not None:
            grid_hw = (image_hw[0] // patch_hw[0], image_hw[1] // patch_hw[1])
    if len(grid_hw) != 2 or math.prod(grid_hw) != n_tokens:
        raise ValueError(
            f"cannot lay the {n_tokens} patch tokens of {name!r} on a grid (patch grid "
            f"{grid_hw}, {n_prefix} prefix tokens dropped); pass a model with a fixed patch grid"
        )
    return tokens_bnc.transpose(1, 2).reshape(len(tokens_bnc), -1, *grid_hw)

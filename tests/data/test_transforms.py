"""Tests for a2mim.data.transforms against hand-computed PIL/numpy pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from a2mim.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    denormalize,
    eval_transform,
    pretrain_transform,
)

MEAN_C = np.array([0.485, 0.456, 0.406])  # ImageNet statistics, stated independently
STD_C = np.array([0.229, 0.224, 0.225])


def rgb_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def normalised_hwc_to_chw(pixels_hwc: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> normalised float (3, H, W), written out per channel."""
    out = np.empty((3, *pixels_hwc.shape[:2]))
    for c in range(3):
        out[c] = (pixels_hwc[:, :, c] / 255.0 - MEAN_C[c]) / STD_C[c]
    return out


def test_imagenet_statistics() -> None:
    np.testing.assert_allclose(IMAGENET_MEAN, MEAN_C)
    np.testing.assert_allclose(IMAGENET_STD, STD_C)


def test_pretrain_output_shape_and_dtype() -> None:
    tf = pretrain_transform(32)
    img_chw = tf(rgb_image(40, 56))
    assert isinstance(img_chw, torch.Tensor)
    assert img_chw.shape == (3, 32, 32) and img_chw.dtype == torch.float32
    assert tf(Image.new("RGB", (28, 28))).shape == (3, 32, 32)  # upsamples small images


def test_pretrain_full_crop_is_bicubic_resize_and_flip() -> None:
    """With scale (1, 1) on a square image the crop is the whole image, so every output is
    the bicubic resize of the input, either as is or mirrored; both must occur."""
    img = rgb_image(20, 20, seed=1)
    resized_hwc = np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC))
    plain = normalised_hwc_to_chw(resized_hwc)
    mirrored = plain[:, :, ::-1]
    bilinear = normalised_hwc_to_chw(np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR)))
    assert np.abs(plain - bilinear).max() > 0.05  # the check below can tell them apart

    tf = pretrain_transform(32, scale=(1.0, 1.0), hflip=True)
    seen = set()
    torch.manual_seed(0)
    for _ in range(24):
        out = tf(img).double().numpy()
        if np.allclose(out, plain, atol=1e-5):
            seen.add("plain")
        elif np.allclose(out, mirrored, atol=1e-5):
            seen.add("mirrored")
        else:
            pytest.fail("output is neither the bicubic resize nor its mirror image")
    assert seen == {"plain", "mirrored"}

    no_flip = pretrain_transform(32, scale=(1.0, 1.0), hflip=False)
    for _ in range(8):
        np.testing.assert_allclose(no_flip(img).double().numpy(), plain, atol=1e-5)


def test_pretrain_crop_is_random() -> None:
    tf = pretrain_transform(16, scale=(0.2, 0.5), hflip=False)
    img = rgb_image(48, 48, seed=2)
    torch.manual_seed(0)
    first, second = tf(img), tf(img)
    assert not torch.equal(first, second)


def test_eval_transform_matches_manual_pipeline() -> None:
    """Short side to floor(224 / 0.875) = 256 (bicubic), centre crop 224, normalise."""
    img = rgb_image(300, 400, seed=3)  # width 400, height 300
    resized = np.asarray(img.resize((341, 256), Image.Resampling.BICUBIC))  # 400 * 256 / 300
    top, left = round((256 - 224) / 2), round((341 - 224) / 2)  # 16, 58 (round half to even)
    crop_hwc = resized[top : top + 224, left : left + 224]
    expected = normalised_hwc_to_chw(crop_hwc)

    out = eval_transform(224, crop_pct=0.875)(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    np.testing.assert_allclose(out.double().numpy(), expected, atol=1e-5)
    assert torch.equal(out, eval_transform(224, crop_pct=0.875)(img))  # deterministic


def test_eval_transform_crop_pct() -> None:
    """crop_pct 0.95 at 32 px resizes the short side to floor(32 / 0.95) = 33."""
    img = rgb_image(28, 28, seed=4)
    resized = np.asarray(img.resize((33, 33), Image.Resampling.BICUBIC))
    expected = normalised_hwc_to_chw(resized[0:32, 0:32])  # round(0.5) = 0: top-left offset 0
    out = eval_transform(32, crop_pct=0.95)(img)
    np.testing.assert_allclose(out.double().numpy(), expected, atol=1e-5)


def test_denormalize_round_trip() -> None:
    gen = torch.Generator().manual_seed(0)
    img01_bchw = torch.rand(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    normalised = torch.empty_like(img01_bchw)
    for c in range(3):
        normalised[:, c] = (img01_bchw[:, c] - MEAN_C[c]) / STD_C[c]
    back = denormalize(normalised)
    assert back.shape == img01_bchw.shape and back.dtype == torch.float64
    torch.testing.assert_close(back, img01_bchw, atol=1e-12, rtol=0)
    torch.testing.assert_close(denormalize(normalised[0]), img01_bchw[0], atol=1e-12, rtol=0)


def test_denormalize_inverts_eval_transform() -> None:
    img = rgb_image(16, 16, seed=5)
    img_bchw = eval_transform(16, crop_pct=1.0)(img)[None]
    pixels_hwc = denormalize(img_bchw)[0].permute(1, 2, 0).numpy() * 255.0
    np.testing.assert_allclose(pixels_hwc, np.asarray(img), atol=1e-3)


def test_denormalize_clamps() -> None:
    out = denormalize(torch.tensor([[[[100.0]], [[-100.0]], [[0.0]]]]))
    assert out.flatten().tolist() == pytest.approx([1.0, 0.0, 0.406])


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(2, 1, 4, 4), torch.zeros(4, 4), torch.zeros(2, 3, 4, 4, dtype=torch.uint8)],
    ids=["one-channel", "2d", "uint8"],
)
def test_denormalize_rejects_bad_input(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="denormalize"):
        denormalize(bad)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: pretrain_transform(0), "img_size"),
        (lambda: pretrain_transform(32, scale=(0.8, 0.5)), "scale"),
        (lambda: pretrain_transform(32, scale=(0.0, 1.0)), "scale"),
        (lambda: eval_transform(32, crop_pct=0.0), "crop_pct"),
        (lambda: eval_transform(32, crop_pct=1.2), "crop_pct"),
    ],
)
def test_bad_arguments(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()

"""The device data path on CPU tensors against the PIL reference path: crop distribution (KS
tests), normalisation (bit-equal), decoding, resizing, flips, erasing and error messages."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision import transforms as T

from a2mim.data.device_pipeline import (
    CropRecipe,
    DeviceAugment,
    EncodedImages,
    check_supported,
    collate_encoded,
    decode_batch,
    normalize_uint8,
    sample_crop_boxes,
)
from a2mim.data.imagefolder import CorruptImageError, ImageFolderDataset, to_rgb
from a2mim.data.transforms import IMAGENET_MEAN, IMAGENET_STD, pretrain_transform

DRAWS = 4000
KS_P_MIN = 1e-3  # two-sample KS test at a fixed seed: reject "same distribution" below this


def rgb_array(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def encoded(arr: np.ndarray, fmt: str = "JPEG") -> torch.Tensor:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def reference_boxes(rrc: T.RandomResizedCrop, height: int, width: int) -> np.ndarray:
    """(DRAWS, 4) boxes from the PIL path's own RandomResizedCrop (torchvision get_params)."""
    img = Image.new("RGB", (width, height))
    torch.manual_seed(123)
    return np.array([rrc.get_params(img, rrc.scale, rrc.ratio) for _ in range(DRAWS)])


def crop_statistics(boxes_b4: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    top, left, h, w = boxes_b4.T.astype(np.float64)
    return {
        "scale": h * w / (height * width),
        "log_ratio": np.log(w / h),
        "centre_y": (top + h / 2) / height,
        "centre_x": (left + w / 2) / width,
    }


@pytest.mark.parametrize(
    ("scale", "height", "width"),
    [
        ((0.67, 1.0), 300, 200),  # A2MIM ViT pre-training scale, portrait
        ((0.08, 1.0), 240, 320),  # fine-tuning scale, landscape
        ((0.67, 1.0), 40, 400),  # very wide: most draws fall back to the central crop
    ],
)
def test_crop_boxes_have_the_pil_paths_distribution(scale, height, width) -> None:
    rrc = pretrain_transform(224, scale=scale).transforms[0]
    assert isinstance(rrc, T.RandomResizedCrop) and tuple(rrc.scale) == scale
    ref = reference_boxes(rrc, height, width)
    ours = sample_crop_boxes(
        torch.full((DRAWS,), height),
        torch.full((DRAWS,), width),
        tuple(rrc.scale),
        tuple(rrc.ratio),
        torch.Generator().manual_seed(7),
    ).numpy()
    assert ours.shape == (DRAWS, 4)
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    ref_stats, our_stats = crop_statistics(ref, height, width), crop_statistics(ours, height, width)
    for key in ref_stats:
        p_value = ks_2samp(ref_stats[key], our_stats[key]).pvalue
        assert p_value > KS_P_MIN, (key, p_value)
    # the share of draws that fall back to the same central crop agrees (binomial, 5 sigma)
    fallback = ref[np.bincount(np.unique(ref, axis=0, return_inverse=True)[1].ravel()).argmax()]
    p_ref = (ref == fallback).all(1).mean()
    p_ours = (ours == fallback).all(1).mean()
    assert abs(p_ref - p_ours) <= 5 * math.sqrt(max(p_ref * (1 - p_ref), 1e-4) * 2 / DRAWS)


def test_crop_boxes_detect_another_distribution() -> None:
    """The KS check has power: a scale range of (0.5, 1.0) is told apart from (0.67, 1.0)."""
    rrc = pretrain_transform(224, scale=(0.67, 1.0)).transforms[0]
    ref = crop_statistics(reference_boxes(rrc, 300, 200), 300, 200)
    other = sample_crop_boxes(
        torch.full((DRAWS,), 300), torch.full((DRAWS,), 200), (0.5, 1.0), tuple(rrc.ratio)
    ).numpy()
    assert ks_2samp(ref["scale"], crop_statistics(other, 300, 200)["scale"]).pvalue < KS_P_MIN


def test_normalisation_is_bit_identical_to_totensor_normalize() -> None:
    arr = rgb_array(17, 23, seed=1)
    reference = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(Image.fromarray(arr)))
    ours = normalize_uint8(torch.from_numpy(arr).permute(2, 0, 1)[None])[0]
    assert ours.dtype == torch.float32 and torch.equal(ours, reference)


def test_jpeg_and_png_decode_like_pil(tmp_path: Path) -> None:
    rgb = rgb_array(20, 30, seed=2)
    gray = rgb[:, :, 0]
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 128, np.uint8)], axis=2)
    deep = (np.arange(600, dtype=np.uint16).reshape(20, 30) * 109).astype(np.uint16)
    files = {
        "a.jpg": encoded(rgb),
        "g.jpg": encoded(gray),
        "c.png": encoded(rgb, "PNG"),
        "d.png": encoded(rgba, "PNG"),
        "e.png": encoded(deep, "PNG"),
    }
    decoded = decode_batch(list(files.values()), "cpu")
    for (name, data), img_chw in zip(files.items(), decoded, strict=True):
        with Image.open(io.BytesIO(data.numpy().tobytes())) as pil:
            expected = np.asarray(to_rgb(pil))
        assert img_chw.dtype == torch.uint8 and img_chw.shape == (3, 20, 30), name
        np.testing.assert_array_equal(img_chw.permute(1, 2, 0).numpy(), expected, err_msg=name)


def test_corrupt_file_is_named() -> None:
    good = encoded(rgb_array(8, 8))
    truncated = good[: len(good) // 3]
    with pytest.raises(CorruptImageError, match=r"/data/b\.jpg") as err:
        decode_batch([good, truncated], "cpu", paths=["/data/a.jpg", "/data/b.jpg"])
    assert err.value.paths == ["/data/b.jpg"]
    with pytest.raises(CorruptImageError, match=r"/data/c\.png"):
        decode_batch([torch.tensor([1, 2, 3, 4], dtype=torch.uint8)], "cpu", ["/data/c.png"])


def test_full_image_crop_matches_the_pil_bicubic_resize_and_flips() -> None:
    """scale = ratio = 1 on a square image: the crop is the whole image, so both paths resize
    the same pixels (antialiased bicubic, PIL vs torch kernels) and flip or not."""
    arr = rgb_array(40, 40, seed=3)
    pil = pretrain_transform(24, scale=(1.0, 1.0), hflip=False).transforms
    rrc = T.RandomResizedCrop(
        24, scale=(1.0, 1.0), ratio=(1.0, 1.0), interpolation=pil[0].interpolation
    )
    reference = T.Compose([rrc, *pil[1:]])(Image.fromarray(arr))
    augment = DeviceAugment(CropRecipe(24, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.5))
    out = augment([encoded(arr, "PNG")] * 16, torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 24, 24) and out.dtype == torch.float32
    grey_level = 1 / 255 / min(IMAGENET_STD)
    seen = set()
    for img_chw in out:
        plain = (img_chw - reference).abs()
        mirrored = (img_chw.flip(-1) - reference).abs()
        err = plain if plain.mean() < mirrored.mean() else mirrored
        seen.add("plain" if err is plain else "mirrored")
        assert err.mean() < 1.0 * grey_level and err.max() <= 8 * grey_level
    assert seen == {"plain", "mirrored"}


def test_seeded_batches_repeat_and_differ() -> None:
    data = [encoded(rgb_array(48, 64, seed=s)) for s in range(4)]
    augment = DeviceAugment(CropRecipe(16, scale=(0.2, 1.0)))
    a = augment(data, torch.Generator().manual_seed(1))
    b = augment(data, torch.Generator().manual_seed(1))
    c = augment(data, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_erasing_on_the_device_path() -> None:
    data = [encoded(rgb_array(32, 32, seed=s)) for s in range(4)]
    plain = DeviceAugment(CropRecipe(16))(data, torch.Generator().manual_seed(3))
    erased = DeviceAugment(CropRecipe(16, reprob=1.0, remode="const"))(
        data, torch.Generator().manual_seed(3)
    )
    changed = (plain != erased).any(dim=1)  # (B, H, W) erased pixels
    assert changed.flatten(1).any(1).all()  # every image got a box
    assert (erased.permute(0, 2, 3, 1)[changed] == 0).all()  # const mode writes zeros


def test_encoded_images_through_a_dataloader(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / "r" / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rgb_array(20, 24, seed=i)).save(
                tmp_path / "r" / "train" / cls / f"{i}.jpg"
            )
    images = ImageFolderDataset(tmp_path / "r", "train")
    loader = torch.utils.data.DataLoader(
        EncodedImages(images), batch_size=4, collate_fn=collate_encoded, num_workers=0
    )
    data, targets, indices = next(iter(loader))
    assert len(data) == 4 and all(d.dtype == torch.uint8 for d in data)
    assert targets.tolist() == [0, 0, 0, 1] and indices.tolist() == [0, 1, 2, 3]
    paths = [images.samples[i][0] for i in indices.tolist()]
    out = DeviceAugment(CropRecipe(16))(data, torch.Generator().manual_seed(0), paths)
    assert out.shape == (4, 3, 16, 16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"auto_augment": "rand-m9-mstd0.5-inc1", "color_jitter": None}, "auto_augment"),
        ({"auto_augment": None, "color_jitter": 0.4}, "color_jitter"),
    ],
)
def test_unsupported_finetune_augmentations_are_refused(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        check_supported(**kwargs)
    check_supported(None, None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 0}, "size"),
        ({"size": 8, "scale": (0.9, 0.5)}, "scale"),
        ({"size": 8, "interpolation": "lanczos"}, "pipeline: pil"),
        ({"size": 8, "hflip": 2.0}, "probabilities"),
    ],
)
def test_bad_recipe(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        CropRecipe(**kwargs)


def test_skip_replaces_a_corrupt_file_and_names_it(caplog: pytest.LogCaptureFixture) -> None:
    a, b = encoded(rgb_array(8, 8, seed=1)), encoded(rgb_array(8, 8, seed=2))
    broken = b[: len(b) // 3]
    with caplog.at_level("WARNING", logger="a2mim.data.device_pipeline"):
        out = decode_batch([a, broken, b], "cpu", ["/d/a.jpg", "/d/x.jpg", "/d/b.jpg"], "skip")
    assert torch.equal(out[1], out[2])  # the next readable image of the batch
    assert "/d/x.jpg" in caplog.text
    with pytest.raises(CorruptImageError, match="every image"):
        decode_batch([broken], "cpu", ["/d/x.jpg"], "skip")


def test_encoded_images_accept_epoch_keys(tmp_path: Path) -> None:
    (tmp_path / "r" / "train" / "a").mkdir(parents=True)
    Image.fromarray(rgb_array(8, 8)).save(tmp_path / "r" / "train" / "a" / "0.jpg")
    encoded_set = EncodedImages(ImageFolderDataset(tmp_path / "r", "train"))
    data, target, index = encoded_set[(3, 0)]
    assert torch.equal(data, encoded_set[0][0]) and (target, index) == (0, 0)
    assert torch.equal(encoded_set[(3, 1, 0)][0], data)  # finetune's (epoch, copy, index)


def test_prefetcher_prepares_one_batch_ahead_in_order() -> None:
    from a2mim.data.device_pipeline import DevicePrefetcher

    calls: list[str] = []

    def prepare(item: int) -> torch.Tensor:
        calls.append(f"prepare {item}")
        return torch.full((2,), item)

    got = []
    for out in DevicePrefetcher(range(3), prepare, "cpu"):
        calls.append(f"use {int(out[0])}")
        got.append(out.tolist())
    assert got == [[0, 0], [1, 1], [2, 2]]
    assert calls == ["prepare 0", "prepare 1", "use 0", "prepare 2", "use 1", "use 2"]

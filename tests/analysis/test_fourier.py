"""Fourier / variance analysis: golden values from an explicit DFT, synthetic maps, and hooks."""

import math

import pytest
import timm
import torch
from torch import nn

from a2mim.analysis.fourier import (
    LOG_EPS,
    block_features,
    default_block_names,
    feature_variance,
    fourier_profile,
    high_frequency_delta,
    relative_log_amplitude,
)


def naive_diagonal_log_amplitude(feat_bchw):
    """Explicit DFT sums at the diagonal frequencies (k, k), k = 0 .. h // 2, float64."""
    _, _, h, _ = feat_bchw.shape
    coords = torch.arange(h, dtype=torch.float64)
    values = []
    for k in range(h // 2 + 1):
        phase_hw = -2 * math.pi * k * (coords[:, None] + coords[None, :]) / h
        real = (feat_bchw * torch.cos(phase_hw)).sum(dim=(-2, -1))
        imag = (feat_bchw * torch.sin(phase_hw)).sum(dim=(-2, -1))
        values.append(torch.log(torch.sqrt(real**2 + imag**2) + LOG_EPS).mean())
    values = torch.stack(values)
    return values - values[0]


@pytest.mark.parametrize("size", [6, 7])
def test_profile_matches_an_explicit_dft(size):
    feat = torch.randn(2, 3, size, size, dtype=torch.float64)
    profile = relative_log_amplitude(feat)
    torch.testing.assert_close(profile.delta_log_amplitude_l, naive_diagonal_log_amplitude(feat))
    expected_frequency = 2 * math.pi * torch.arange(size // 2 + 1, dtype=torch.float64) / size
    torch.testing.assert_close(profile.frequency_l, expected_frequency)
    assert (profile.frequency_l[-1] == math.pi) == (size % 2 == 0)


@pytest.mark.parametrize(("size", "k0"), [(8, 2), (8, 3), (9, 4)])
def test_diagonal_sinusoid_peaks_at_its_frequency(size, k0):
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    wave = torch.cos(2 * math.pi * k0 * (x + y) / size).double() + 2.0
    profile = relative_log_amplitude(wave[None, None].expand(2, 4, -1, -1))
    peak = int(profile.delta_log_amplitude_l[1:].argmax()) + 1
    assert peak == k0
    assert profile.frequency_l[peak] == pytest.approx(2 * math.pi * k0 / size)
    # DC amplitude 2 n^2, peak amplitude n^2 / 2: their log ratio is log(1/4).
    assert profile.delta_log_amplitude_l[peak] == pytest.approx(math.log(0.25), abs=1e-6)


def test_checkerboard_has_high_frequency_and_a_constant_map_has_none():
    size = 8
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    checkerboard = ((-1.0) ** (x + y)).double()[None, None]
    constant = torch.full((1, 1, size, size), 3.0, dtype=torch.float64)
    # All energy at (pi, pi) vs all energy at 0 (amplitudes n^2 * a; elsewhere only LOG_EPS).
    assert high_frequency_delta(checkerboard) == pytest.approx(math.log(size**2 / LOG_EPS))
    assert high_frequency_delta(constant) == pytest.approx(-math.log(3 * size**2 / LOG_EPS))
    mixed = constant + 0.1 * checkerboard
    assert high_frequency_delta(mixed) == pytest.approx(math.log(0.1 / 3), abs=1e-6)


def test_feature_variance_of_a_known_tensor():
    feat = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]]])  # (1, 2, 2, 2)
    # Unbiased variance of 0, 1, 2, 3 is 5/3; the constant channel contributes 0.
    assert feature_variance(feat) == pytest.approx(5 / 6)
    assert feature_variance(torch.cat([feat, 2 * feat])) == pytest.approx((5 / 6 + 20 / 6) / 2)
    with pytest.raises(ValueError, match="1 x 1 map"):
        feature_variance(torch.zeros(2, 3, 1, 1))


def test_resnet_blocks_and_stem_through_hooks():
    model = timm.create_model("resnet18", num_classes=3).eval()
    names = default_block_names(model)
    assert names == ["maxpool"] + [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    img = torch.randn(2, 3, 64, 64)
    features = block_features(model, names, img)
    assert [f.shape[-1] for f in features] == [16, 16, 16, 8, 8, 4, 4, 2, 2]
    with torch.no_grad():
        stem = model.maxpool(model.act1(model.bn1(model.conv1(img))))
        stages = model.forward_intermediates(img, indices=4, intermediates_only=True)
    torch.testing.assert_close(features[0], stem)
    for stage, feat in zip(stages, features[2::2], strict=True):
        torch.testing.assert_close(feat, stage)
    assert all(not module._forward_hooks for module in model.modules())


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_vit_tokens_become_maps_without_prefix_tokens(reg_tokens):
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, reg_tokens=reg_tokens
    ).eval()
    assert default_block_names(model) == ["blocks.0", "blocks.1"]
    img = torch.randn(2, 3, 32, 32)
    features = block_features(model, ["blocks.0", "blocks.1"], img)
    with torch.no_grad():
        expected = model.forward_intermediates(
            img, indices=2, norm=False, output_fmt="NCHW", intermediates_only=True
        )
    for feat, reference in zip(features, expected, strict=True):
        assert feat.shape == (2, 192, 4, 4)
        torch.testing.assert_close(feat, reference)


def test_captured_output_is_not_changed_by_later_inplace_ops():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(inplace=True))
    x = torch.randn(3, 1, 4, 4)
    (conv_out,) = block_features(model, ["0"], x)
    with torch.no_grad():
        torch.testing.assert_close(conv_out, model[0](x))
    assert (conv_out < 0).any()


def test_fourier_profile_rows():
    model = timm.create_model("resnet18", num_classes=3)
    rows = fourier_profile(model, default_block_names(model), torch.randn(2, 3, 64, 64))
    assert [row["name"] for row in rows] == default_block_names(model)
    assert rows[0]["depth"] == 0.0 and rows[-1]["depth"] == 1.0
    assert all(math.isfinite(row["delta_log_amp_pi"]) and row["variance"] > 0 for row in rows)


def test_unknown_models_and_names_are_explained():
    with pytest.raises(ValueError, match="pass module names explicitly"):
        default_block_names(nn.Linear(2, 2))
    with pytest.raises(KeyError, match="not in ResNet"):
        block_features(timm.create_model("resnet18"), ["layer9"], torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="square"):
        relative_log_amplitude(torch.randn(1, 1, 4, 6))

import math

import pytest
import torch

from a2mim.mim.masking import BlockMaskGenerator, fill_masked, mask_scale, upsample_mask


def test_exact_masked_count_reference_geometry():
    gen = BlockMaskGenerator(224, 32, 0.6)
    assert (gen.grid, gen.num_cells, gen.num_masked) == (7, 49, 30)
    mask = gen(16, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (16, 7, 7) and mask.dtype == torch.bool
    assert mask.flatten(1).sum(1).tolist() == [30] * 16


@pytest.mark.parametrize("size,patch,ratio", [(32, 8, 0.6), (64, 16, 0.7), (96, 32, 0.5)])
def test_count_is_ceil_of_cells_times_ratio(size, patch, ratio):
    gen = BlockMaskGenerator(size, patch, ratio)
    cells = (size // patch) ** 2
    expected = math.ceil(round(cells * ratio, 9))
    assert gen(5).flatten(1).sum(1).tolist() == [expected] * 5


def test_seeded_and_batched_draws_differ_per_image():
    gen = BlockMaskGenerator(224, 32, 0.6)
    a = gen(8, generator=torch.Generator().manual_seed(3))
    b = gen(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert len({tuple(m.flatten().tolist()) for m in a}) == 8


def test_cells_are_uniform():
    gen = BlockMaskGenerator(32, 8, 0.25)  # 16 cells, 4 masked
    freq = gen(4000, generator=torch.Generator().manual_seed(0)).float().mean(0)
    assert torch.allclose(freq, torch.full_like(freq, 0.25), atol=0.03)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(input_size=224, mask_patch_size=32, mask_ratio=1.0), "mask_ratio"),
        (dict(input_size=224, mask_patch_size=32, mask_ratio=0.0), "mask_ratio"),
        (dict(input_size=224, mask_patch_size=48, mask_ratio=0.6), "not divisible"),
    ],
)
def test_invalid_generator_config(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        BlockMaskGenerator(**kwargs)


def test_mask_patch_must_be_multiple_of_stride():
    assert mask_scale(32, 16, "x") == 2
    with pytest.raises(ValueError, match="multiple of the stride 16"):
        mask_scale(24, 16, "resnet50 stage3")


def test_upsample_is_nearest_repeat():
    mask = BlockMaskGenerator(224, 32, 0.6)(3)
    up = upsample_mask(mask, 32)
    ref = mask.repeat_interleave(32, 1).repeat_interleave(32, 2)
    assert torch.equal(up, ref)
    assert up.shape == (3, 224, 224)
    assert torch.equal(upsample_mask(mask, 2), mask.repeat_interleave(2, 1).repeat_interleave(2, 2))


def test_mean_fill_is_each_images_own_mean():
    img = torch.randn(4, 3, 32, 32) * 2 + torch.arange(4.0)[:, None, None, None]
    mask = upsample_mask(BlockMaskGenerator(32, 8, 0.6)(4), 8)[:, None]
    out = fill_masked(img, mask, "mean")
    for b in range(4):
        for c in range(3):
            mean = img[b, c].mean()  # over the whole image, masked area included
            assert torch.allclose(out[b, c][mask[b, 0]], mean.expand(int(mask[b].sum())))
            assert torch.equal(out[b, c][~mask[b, 0]], img[b, c][~mask[b, 0]])


def test_zero_and_none_fill():
    img = torch.randn(2, 3, 32, 32)
    mask = upsample_mask(BlockMaskGenerator(32, 8, 0.6)(2), 8)[:, None]
    zero = fill_masked(img, mask, "zero")
    assert (zero[mask.expand_as(img)] == 0).all()
    assert torch.equal(zero[~mask.expand_as(img)], img[~mask.expand_as(img)])
    assert fill_masked(img, mask, "none") is img
    with pytest.raises(ValueError, match="fill mode"):
        fill_masked(img, mask, "noise")

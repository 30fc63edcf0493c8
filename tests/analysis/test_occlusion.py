"""Occlusion robustness: ratio 0 / ratio 1 known answers, an exact golden model, and the masks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from a2mim.analysis.occlusion import (
    DEFAULT_OCCLUSION_RATIOS,
    occlude,
    occlusion_accuracy,
    occlusion_masks,
    ratio_generator,
)


def tiny_cnn(n_classes=4):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, n_classes),
    )
    model[1].running_mean.uniform_(-0.2, 0.2)
    return model


class BrightestPatch(nn.Module):
    """Predicts the index of the patch with the largest mean (classes = patches)."""

    def __init__(self, patch_size):
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x_bchw):
        return F.avg_pool2d(x_bchw.mean(dim=1, keepdim=True), self.patch_size).flatten(1)


def bright_patch_images(n_images, grid, patch_size, generator):
    """Background 0.5, one patch at 1.0 whose index is the label (never patch 0)."""
    labels_b = torch.randint(1, grid * grid, (n_images,), generator=generator)
    cells_bn = torch.full((n_images, grid * grid), 0.5)
    cells_bn[torch.arange(n_images), labels_b] = 1.0
    cells_bhw = cells_bn.reshape(n_images, grid, grid)
    pixels = cells_bhw.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    return pixels[:, None].expand(-1, 3, -1, -1).clone(), labels_b


def test_ratio_zero_is_plain_accuracy():
    model = tiny_cnn().eval()
    images = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 4, (24,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = 100.0 * (model(images).argmax(1) == labels).float().mean().item()
    model.train()
    accuracy = occlusion_accuracy(model, (images, labels), ratios=(0.0,), patch_size=4)
    assert accuracy == {0.0: pytest.approx(plain)}
    assert model.training  # mode restored


def test_full_occlusion_equals_accuracy_on_the_mean_image():
    model = tiny_cnn().eval()
    images = torch.randn(30, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, 4, (30,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        constant_class = model(torch.zeros(1, 3, 28, 28)).argmax(1)
    expected = 100.0 * (labels == constant_class).float().mean().item()
    accuracy = occlusion_accuracy(model, (images, labels), ratios=(1.0,), patch_size=4)
    assert accuracy[1.0] == pytest.approx(expected)


def test_trained_toy_model_goes_from_accurate_to_chance_level():
    """A CNN trained on a balanced 4-class toy task (class = which colour channel is raised):
    accurate with nothing occluded, exactly chance (25 %) with everything occluded, since every
    image then becomes the mean image and gets the same class."""
    generator = torch.Generator().manual_seed(7)
    labels = torch.arange(4).repeat_interleave(16)
    images = 0.3 * torch.randn(64, 3, 28, 28, generator=generator)
    images[torch.arange(64), labels % 3] += 1.0  # classes 0-2: one channel up
    images[labels == 3] -= 1.0  # class 3: all channels down
    model = tiny_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    accuracy = occlusion_accuracy(model.eval(), (images, labels), (0.0, 1.0), patch_size=4)
    assert accuracy[0.0] >= 95.0
    assert accuracy[1.0] == pytest.approx(25.0)


@pytest.mark.parametrize("per_image", [True, False])
def test_bright_patch_model_is_correct_exactly_when_its_patch_survives(per_image):
    grid, patch_size, seed = 7, 4, 5  # 28 px images
    generator = torch.Generator().manual_seed(6)
    batches = [bright_patch_images(n, grid, patch_size, generator) for n in (16, 9)]
    ratios = (0.0, 0.3, 0.5, 0.9)
    accuracy = occlusion_accuracy(
        BrightestPatch(patch_size), batches, ratios, patch_size, per_image=per_image, seed=seed
    )
    for ratio in ratios:
        draws = ratio_generator(seed, ratio)
        survived = []
        for images, labels in batches:
            drop_bhw = occlusion_masks(
                len(images), (grid, grid), round(49 * ratio), per_image=per_image, generator=draws
            )
            survived.append(~drop_bhw.flatten(1)[torch.arange(len(images)), labels])
        expected = 100.0 * torch.cat(survived).float().mean().item()
        assert accuracy[ratio] == pytest.approx(expected)
    assert accuracy[0.0] == 100.0
    assert accuracy[0.9] < 40.0


def test_per_image_and_per_batch_masks():
    per_image = occlusion_masks(
        6, (4, 5), 7, per_image=True, generator=torch.Generator().manual_seed(0)
    )
    per_batch = occlusion_masks(
        6, (4, 5), 7, per_image=False, generator=torch.Generator().manual_seed(0)
    )
    assert per_image.shape == per_batch.shape == (6, 4, 5)
    assert (per_image.flatten(1).sum(1) == 7).all() and (per_batch.flatten(1).sum(1) == 7).all()
    assert (per_batch == per_batch[:1]).all()
    assert len({tuple(row) for row in per_image.flatten(1).tolist()}) > 1


def test_results_are_seeded_and_depend_on_the_mask_scheme():
    generator = torch.Generator().manual_seed(7)
    data = bright_patch_images(64, 8, 4, generator)
    model = BrightestPatch(4)
    ratios = DEFAULT_OCCLUSION_RATIOS

    def run(**kwargs):
        return occlusion_accuracy(model, data, ratios, patch_size=4, **kwargs)

    assert run(seed=1) == run(seed=1)
    assert run(seed=1) != run(seed=2)
    assert run(seed=1, per_image=True) != run(seed=1, per_image=False)
    # A ratio's result does not depend on which other ratios are evaluated.
    alone = occlusion_accuracy(model, data, (0.5,), patch_size=4, seed=1)
    assert alone[0.5] == run(seed=1)[0.5]


def test_occlude_zeroes_exactly_the_dropped_patches():
    images = torch.randn(2, 3, 8, 8) + 10
    drop_bhw = torch.tensor([[[True, False], [False, False]], [[False, False], [False, True]]])
    occluded = occlude(images, drop_bhw, 4)
    assert (occluded[0, :, :4, :4] == 0).all() and (occluded[1, :, 4:, 4:] == 0).all()
    assert (occluded[0, :, 4:, :] == images[0, :, 4:, :]).all()
    assert (occluded != 0).sum() == 2 * 3 * 64 - 2 * 3 * 16


def test_bad_arguments_are_explained():
    data = (torch.zeros(2, 3, 30, 30), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="not a multiple of patch_size=4"):
        occlusion_accuracy(tiny_cnn(), data, patch_size=4)
    with pytest.raises(ValueError, match="must lie in"):
        occlusion_accuracy(tiny_cnn(), data, ratios=(1.5,), patch_size=5)
    with pytest.raises(ValueError, match="got no images"):
        occlusion_accuracy(tiny_cnn(), [], patch_size=5)

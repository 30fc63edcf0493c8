"""The stages' input paths on real Fashion-MNIST images: ``data.pipeline: device`` (decode, crop,
flip, erasing on the training device; here the CPU) trains in pretrain and finetune, refuses
augmentations it does not have, and persistent DataLoader workers give the batches of a loader
rebuilt every epoch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from a2mim.config import ConfigError
from a2mim.stages import finetune, pretrain


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fmnist(fmnist_subset) -> Path:
    return fmnist_subset(8, 2)  # conftest.py: made once per session


def _pretrain_cfg(root: Path, **data) -> dict:
    return {
        "scale": "tiny",
        "model": {"preset": "a2mim_resnet18"},
        "data": {"root": str(root), **data},
        "optim": {"base_lr": 1e-3, "lr_batch_divisor": 16, "warmup_epochs": 0.5},
        "epochs": 2,
        "batch_size": 16,
        "ckpt_every_steps": 100,
        "log_every_steps": 1,
        "figure_every_epochs": 100,
        "figure_images": 2,
        "progress": False,
        "track": False,
    }


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row and "img_per_s" in row]


def test_persistent_workers_give_the_batches_of_a_fresh_loader(fmnist, tmp_path):
    """Two epochs with two persistent workers == two epochs in the main process (the same
    seeded order and augmentations; only who computes them differs)."""
    pretrain.run(pretrain.load_config(_pretrain_cfg(fmnist)), tmp_path / "w0")
    pretrain.run(pretrain.load_config(_pretrain_cfg(fmnist, num_workers=2)), tmp_path / "w2")
    assert _losses(tmp_path / "w2") == _losses(tmp_path / "w0")
    assert len(_losses(tmp_path / "w0")) == 10  # 80 images / 16 per step x 2 epochs


def test_pretrain_on_the_device_path(fmnist, tmp_path):
    cfg = pretrain.load_config(_pretrain_cfg(fmnist, pipeline="device", num_workers=1))
    metrics = pretrain.run(cfg, tmp_path / "dev")
    losses = _losses(tmp_path / "dev")
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert metrics["final_loss"] == pytest.approx(losses[-1])
    # another data path, another random stream: not the PIL path's batches
    pil = pretrain.run(pretrain.load_config(_pretrain_cfg(fmnist)), tmp_path / "pil")
    assert pil["final_loss"] != metrics["final_loss"]
    again = pretrain.run(cfg, tmp_path / "dev2")  # but reproducible
    assert again["final_loss"] == metrics["final_loss"]


def _finetune_cfg(root: Path, **data) -> dict:
    return {
        "scale": "tiny",
        "model": {"backbone": "resnet18", "img_size": 32},
        "data": {"root": str(root), "scale": [0.35, 1.0], "test_crop_pct": 1.0, **data},
        "optim": {"opt": "lamb", "base_lr": 5e-3, "lr_batch_divisor": 16, "warmup_epochs": 0.5},
        "mixup": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0},
        "epochs": 1,
        "batch_size": 16,
        "ckpt_every_steps": 100,
        "log_every_steps": 1,
        "progress": False,
        "track": False,
    }


def test_finetune_on_the_device_path(fmnist, tmp_path):
    device_data = {"pipeline": "device", "auto_augment": None, "color_jitter": None}
    cfg = finetune.load_config(_finetune_cfg(fmnist, **device_data, reprob=0.25))
    metrics = finetune.run(cfg, tmp_path / "ft")
    losses = _losses(tmp_path / "ft")
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses)
    assert 0.0 <= metrics["top1"] <= 100.0


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"pipeline": "device", "color_jitter": None}, "auto_augment"),
        ({"pipeline": "device", "auto_augment": None}, "color_jitter"),
        (
            {
                "pipeline": "device",
                "auto_augment": None,
                "color_jitter": None,
                "interpolation": "random",
            },
            "interpolation",
        ),
    ],
)
def test_device_path_refuses_what_it_does_not_have(fmnist, data, match):
    with pytest.raises(ConfigError, match=match):
        finetune.load_config(_finetune_cfg(fmnist, **data))

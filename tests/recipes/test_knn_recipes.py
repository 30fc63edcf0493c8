"""The k-NN recipes: DINO's / solo-learn's k and temperature, the reference ViT encoder loads
into the ViT recipe strictly, and the tiny recipe runs end to end on real Fashion-MNIST."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from a2mim import recipes
from a2mim.config import load_yaml
from a2mim.data.fashion_mnist import prepare_fashion_mnist
from a2mim.mim.presets import get_preset
from a2mim.stages import knn, linprobe
from a2mim.train.encoder import load_encoder

from .test_paper_recipes import _encoder_pt


def _recipe(name: str) -> knn.KnnConfig:
    return knn.load_config(load_yaml(recipes.resolve("knn", name)), f"knn/{name}")


@pytest.mark.parametrize("name", ["resnet50", "vit", "tiny"])
def test_knn_recipe_follows_dino(name):
    assert name in recipes.available("knn")
    cfg = _recipe(name)
    assert (cfg.k, cfg.temperature) == (20, 0.07)  # DINO eval_knn.py, solo-learn defaults
    if cfg.scale == "paper":
        assert cfg.model.img_size == 224 and cfg.data.test_crop_pct == 0.875  # 256 -> 224


def test_knn_vit_reads_the_features_the_vit_probe_reads():
    vit, probe = _recipe("vit"), linprobe.load_config(load_yaml(recipes.resolve("linprobe", "vit")))
    assert vit.model.backbone == probe.model.backbone
    assert vit.model.backbone_kwargs == probe.model.backbone_kwargs
    mim = get_preset("a2mim_vit_base")
    assert vit.model.backbone == mim.backbone


def test_reference_vit_encoder_loads_strictly_into_the_knn_recipe(tmp_path):
    cfg = _recipe("vit").model
    encoder_pt = _encoder_pt(tmp_path, "a2mim_vit_base")
    encoder = knn.create_classifier(
        cfg.backbone, 0, cfg.img_size, cfg.backbone_kwargs, global_pool=cfg.global_pool
    )
    report = load_encoder(
        encoder, str(encoder_pt), cfg.backbone, cfg.img_size, cfg.backbone_kwargs,
        allow_new_head=False,
    )  # fmt: skip
    assert report["loaded"] == len(encoder.state_dict()) and not report["dropped"]


def test_tiny_recipe_runs_on_fashion_mnist(tmp_path):
    root = tmp_path / "fm"
    prepare_fashion_mnist(root, train_per_class=3, val_per_class=1)
    cfg = _recipe("tiny")
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, root=str(root)), track=False, progress=False
    )
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = knn.run(cfg, tmp_path / "run")
    finally:
        torch.set_num_threads(before)
    assert set(metrics) == {"knn_top1", "knn_top5"}
    assert 0 <= metrics["knn_top1"] <= metrics["knn_top5"] <= 100
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics

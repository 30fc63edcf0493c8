"""Pre-training settings of the paper recipes: sync_bn (the reference ResNet-50 SyncBN) refuses
CPU/gloo clearly; a step milestone the run never reaches is refused when the config loads."""

from __future__ import annotations

import pytest

from a2mim import recipes
from a2mim.config import ConfigError, load_yaml
from a2mim.stages import pretrain
from a2mim.train import engine


def test_resnet50_paper_recipes_ask_for_sync_bn():
    for name in ("resnet50_100ep", "resnet50_300ep", "simmim_resnet50_300ep"):
        assert pretrain.load_config(load_yaml(recipes.resolve("pretrain", name))).sync_bn


def test_sync_bn_on_cpu_processes_is_a_config_error_before_any_output(monkeypatch, tmp_path):
    cfg = pretrain.load_config(
        {"model": {"preset": "a2mim_resnet18"}, "sync_bn": True, "device": "cpu", "track": False}
    )
    monkeypatch.setattr(engine, "world_info", lambda: (0, 2))
    with pytest.raises(ConfigError, match=r"sync_bn: SyncBatchNorm needs CUDA.*set sync_bn: false"):
        pretrain.run(cfg, tmp_path / "run")
    assert not any((tmp_path / "run").iterdir())


def test_step_recipe_run_past_its_milestone_is_refused_at_load():
    # The 800-epoch step recipe run for 300 epochs (the old Table 2 ViT-S run): never decays.
    data = load_yaml(recipes.resolve("pretrain", "vit_small_800ep"))
    with pytest.raises(ConfigError, match=r"never decay.*optim.schedule: cosine"):
        pretrain.load_config({**data, "epochs": 300})

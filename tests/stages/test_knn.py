"""The k-NN evaluation: the vote against a naive loop, the stage through the CLI (a bank that
holds the queries themselves gives 100 % at k=1), and the monitor inside pretraining."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from a2mim.cli import main
from a2mim.stages import knn, pretrain


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fmnist(fmnist_subset):
    return fmnist_subset(4, 2)  # conftest.py: made once per session


def test_scores_match_a_naive_weighted_vote():
    gen = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(30, 8, generator=gen), dim=1)
    labels = torch.randint(4, (30,), generator=gen)
    queries = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=1)
    scores = knn.knn_scores(queries, bank, labels, 4, k=7, temperature=0.1)
    for q in range(5):
        sims = [(float(queries[q] @ bank[m]), int(labels[m])) for m in range(30)]
        expected = [0.0] * 4
        for sim, label in sorted(sims, reverse=True)[:7]:
            expected[label] += math.exp(sim / 0.1)
        assert scores[q].tolist() == pytest.approx(expected, rel=1e-5)


def test_stage_with_the_queries_in_the_bank_is_exact_at_k1(fmnist, tmp_path, capsys):
    # a random one-block ViT averaging its 8 px patch tokens: features that keep the image (a
    # random deep CNN's point all one way), so each image's nearest neighbour is itself
    vit = {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"depth": 1, "patch_size": 8}}
    cfg = {
        "scale": "tiny",
        "model": {**vit, "img_size": 32, "global_pool": "avg"},
        "data": {"root": str(fmnist), "split": "val", "val_split": "val", "test_crop_pct": 1},
        "k": 1,
        "batch_size": 8,
        "track": False,
    }
    cfg_file = tmp_path / "knn.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["knn", "--config", str(cfg_file), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == {"knn_top1": 100.0, "knn_top5": 100.0}
    assert json.loads(capsys.readouterr().out) == metrics
    resolved = yaml.safe_load((out / "resolved_config.yaml").read_text())
    assert resolved["derived"]["num_val_images"] == 20 and resolved["derived"]["init"] is None
    with pytest.raises(knn.ConfigError, match=r"temperature: 0\.0 is out of range; allowed: > 0"):
        knn.load_config({**cfg, "temperature": 0})


def test_pretraining_logs_the_knn_monitor(fmnist, tmp_path):
    cfg = pretrain.load_config(
        {
            "scale": "tiny",
            "model": {"preset": "a2mim_resnet18"},
            "data": {"root": str(fmnist)},
            "optim": {"base_lr": "1e-3", "lr_batch_divisor": 16, "warmup_epochs": 0.5},
            "epochs": 2,
            "batch_size": 8,
            "figure_images": 2,
            "figure_every_epochs": 5,
            "knn": {"every_epochs": 1, "k": 5, "batch_size": 20},
            "progress": False,
            "track": False,
        }
    )
    pretrain.run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    knn_rows = [row for row in rows if "knn_top1" in row]
    assert [row["step"] for row in knn_rows] == [5, 10]  # 40 images / 8 = 5 steps an epoch
    assert all(0 <= row["knn_top1"] <= 100 for row in knn_rows)
    # the monitor's number is the stage's number on the saved encoder
    init = tmp_path / "encoder.pt"
    direct = knn.run(
        knn.load_config(
            {
                "model": {"backbone": "resnet18", "img_size": 32},
                "data": {"root": str(fmnist), "test_crop_pct": 1.0},
                "init": str(init),
                "k": 5,
                "batch_size": 20,
                "track": False,
            }
        ),
        tmp_path / "knn",
    )
    assert direct["knn_top1"] == knn_rows[-1]["knn_top1"]

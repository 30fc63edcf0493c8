"""`a2mim.train.param_groups` gives each caller exactly the groups its own builder gave before
(captured at 2d20777 by `tests/train/param_group_cases.py`): the same groups in the same order,
each with the same parameters in the same order and the same settings, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from a2mim.train.param_groups import build_param_groups, layer_scale, timm_layer_ids
from tests.train.param_group_cases import CASES, capture

EXPECTED = json.loads((Path(__file__).parent / "param_groups_expected.json").read_text())


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_case_is_pinned():
    assert sorted(CASES) == sorted(EXPECTED)


@pytest.mark.parametrize("case", sorted(CASES))
def test_groups_are_unchanged(case):
    assert capture(case) == EXPECTED[case]


def test_layer_decay_follows_timm_group_matcher():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", depth=2, pretrained=False)
    ids = timm_layer_ids(model)
    assert ids["pos_embed"] == 0 and ids["blocks.1.mlp.fc1.weight"] == 2
    groups = build_param_groups(
        model.named_parameters(),
        0.05,
        lambda name, param: param.ndim <= 1,
        layer_of=lambda name: ids.get(name, 3),
        num_layers=3,
        layer_decay=0.5,
    )
    assert [(g["lr_scale"], g["weight_decay"]) for g in groups][:2] == [(0.125, 0.05), (0.125, 0.0)]
    assert layer_scale(1, 3, None) == 1.0 and layer_scale(1, 3, 0.5) == 0.25

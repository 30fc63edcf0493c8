"""Config validation shared by every stage: every numeric key is range-checked (an out-of-range
value is a ConfigError naming the key, the value and the allowed range, before any output),
float keys take YAML-1.1 number strings, and a refused config leaves nothing behind."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from a2mim import recipes
from a2mim.cli import main
from a2mim.config import ConfigError, load_yaml
from a2mim.stages import detect, finetune, knn, linprobe, pretrain, segment

STAGES = {
    "pretrain": pretrain,
    "finetune": finetune,
    "linprobe": linprobe,
    "detect": detect,
    "segment": segment,
    "knn": knn,
}
CONFIGS = {
    "pretrain": pretrain.PretrainConfig,
    "finetune": finetune.FinetuneConfig,
    "linprobe": linprobe.LinprobeConfig,
    "detect": detect.DetectConfig,
    "segment": segment.SegmentConfig,
    "knn": knn.KnnConfig,
}


def _base(stage: str) -> dict:
    if stage == "knn":
        return {"model": {"backbone": "resnet18"}}
    data = load_yaml(recipes.resolve(stage, "tiny"))
    data.pop("stage", None)
    return data


def _numeric_keys(cls, prefix: str = ""):
    """``(dotted key, default)`` of every int / float field (tuples of them included)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        parts = [tp, *typing.get_args(tp)]
        parts += [a for p in parts[1:] for a in typing.get_args(p)]
        nested = [p for p in parts if dataclasses.is_dataclass(p)]
        if nested:
            yield from _numeric_keys(nested[0], f"{prefix}{f.name}.")
        elif any(p in (int, float) for p in parts):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield f"{prefix}{f.name}", default


def _set(data: dict, key: str, value) -> dict:
    data = yaml.safe_load(yaml.safe_dump(data))
    node = data
    *head, last = key.split(".")
    for part in head:
        node = node.setdefault(part, {})
    node[last] = value
    return data


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_numeric_key_is_range_checked(stage):
    base = _base(stage)
    STAGES[stage].load_config(base)  # the base is valid
    keys = list(_numeric_keys(CONFIGS[stage]))
    assert len(keys) >= 7
    for key, default in keys:
        bad = [-1] * max(1, len(default)) if isinstance(default, tuple) else -1
        with pytest.raises(ConfigError, match=key.split(".")[-1]):
            STAGES[stage].load_config(_set(base, key, bad))


@pytest.mark.parametrize(
    "key", ["epochs", "batch_size", "accum_steps", "ckpt_every_steps", "log_every_steps"]
)
@pytest.mark.parametrize("value", [0, -1])
def test_zero_or_negative_counts_name_key_value_and_range(key, value):
    with pytest.raises(
        ConfigError, match=rf"config\.{key}: {value} is out of range; allowed: >= 1"
    ):
        pretrain.load_config({**_base("pretrain"), key: value})


def test_float_keys_take_yaml_1_1_number_strings():
    cfg = pretrain.load_config({**_base("pretrain"), "optim": {"base_lr": "1e-3"}})
    assert cfg.optim.base_lr == 1e-3
    assert yaml.safe_load("1e-3") == "1e-3"  # why: PyYAML follows YAML 1.1
    with pytest.raises(ConfigError, match=r"optim\.base_lr: expected a number, got 'fast'"):
        pretrain.load_config({**_base("pretrain"), "optim": {"base_lr": "fast"}})
    with pytest.raises(ConfigError, match=r"optim\.base_lr: -0\.1 is out of range; allowed: > 0"):
        pretrain.load_config({**_base("pretrain"), "optim": {"base_lr": "-1e-1"}})


def test_cli_refuses_epochs_0_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["pretrain", "--config", "tiny", "--out", str(out), "--set", "epochs=0"])
    assert code == 2 and not out.exists()
    assert "epochs: 0 is out of range; allowed: >= 1" in capsys.readouterr().err

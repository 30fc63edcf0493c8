"""The linprobe stage on real Fashion-MNIST images: config errors, strict loading of the frozen
backbone, head-only training (backbone weights and BatchNorm statistics untouched), metrics
checked against a naive evaluation, and exact resume."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import yaml
from PIL import Image

from a2mim import predictions
from a2mim.config import ConfigError
from a2mim.data.transforms import eval_transform
from a2mim.mim import MaskedImageModel, get_preset
from a2mim.stages import linprobe
from a2mim.train import checkpoint
from a2mim.train.classify import LinearProbe, load_classifier


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _save_encoder(path, preset: str, seed: int = 0):
    """An encoder.pt as ``a2mim pretrain`` writes it, from a fresh A²MIM model whose BatchNorm
    statistics are moved off their defaults (so "unchanged" means something)."""
    mc = get_preset(preset)
    torch.manual_seed(seed)
    model = MaskedImageModel(mc)
    state = model.encoder_state_dict()
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var")):
            state[key] = value + torch.rand_like(value)
    meta = {
        "stage": "pretrain",
        "backbone": mc.backbone,
        "backbone_kwargs": dict(mc.backbone_kwargs),
        "img_size": mc.img_size,
    }
    checkpoint.atomic_save({"state_dict": state, "meta": meta}, path)
    return state


@pytest.fixture(scope="module")
def resnet_encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    return path, _save_encoder(path, "a2mim_resnet18")


def _cfg(root, **top) -> dict:
    cfg = {
        "scale": "tiny",
        "model": {"backbone": "resnet18", "img_size": 32},
        "data": {"root": str(root), "crop_scale": [0.35, 1.0], "test_crop_pct": 1.0},
        "optim": {"base_lr": 0.1, "lr_batch_divisor": 16},
        "epochs": 2,
        "batch_size": 16,
        "ckpt_every_steps": 3,
        "log_every_steps": 1,
        "progress": False,
        "track": False,
    }
    for key, value in top.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and key in cfg else value
    return cfg


def test_unknown_key_lists_valid_keys(fmnist):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epoch'\].*did you mean 'epochs'"):
        linprobe.load_config({**_cfg(fmnist), "epoch": 3})
    with pytest.raises(ConfigError, match=r"optim: unknown key.*\['layer_decay'\].*valid keys"):
        linprobe.load_config(_cfg(fmnist, optim={"layer_decay": 0.65}))
    with pytest.raises(ConfigError, match=r"model\.feature_bn: expected true/false"):
        linprobe.load_config(_cfg(fmnist, model={"feature_bn": "yes"}))
    with pytest.raises(ConfigError, match="'vit_tiny' is not a timm model"):
        linprobe.load_config(_cfg(fmnist, model={"backbone": "vit_tiny"}))


def test_wrong_checkpoint_is_a_clear_error(fmnist, tmp_path):
    other = timm.create_model("resnet10t", num_classes=0)
    bad = tmp_path / "encoder.pt"
    meta = {"backbone": "resnet10t", "backbone_kwargs": {}, "img_size": 32}
    checkpoint.atomic_save({"state_dict": other.state_dict(), "meta": meta}, bad)
    cfg = linprobe.load_config(_cfg(fmnist, init=str(bad)))
    with pytest.raises(ValueError) as err:
        linprobe.run(cfg, tmp_path / "run")
    msg = str(err.value)
    missing = next(ln for ln in msg.splitlines() if "missing keys:" in ln)
    unexpected = next(ln for ln in msg.splitlines() if "unexpected keys:" in ln)
    assert "conv1.weight" in missing and "unexpected keys: conv1.0.weight" in unexpected
    assert "the checkpoint says {'backbone': 'resnet10t'" in msg


def test_vit_probe_needs_every_backbone_weight(fmnist, tmp_path):
    """Unlike fine-tuning, the probe loads no head: a ViT with average pooling (which swaps the
    pretrained final norm for a fresh fc_norm) is refused, with the keys named."""
    path = tmp_path / "encoder.pt"
    _save_encoder(path, "a2mim_vit_tiny")
    vit = get_preset("a2mim_vit_tiny")
    model = {"backbone": vit.backbone, "backbone_kwargs": dict(vit.backbone_kwargs)}
    cfg = linprobe.load_config(_cfg(fmnist, init=str(path), model={**model, "global_pool": "avg"}))
    with pytest.raises(ValueError) as err:
        linprobe.build_probe(cfg, 10)
    lines = str(err.value).splitlines()
    assert "  missing keys: fc_norm.bias, fc_norm.weight" in lines
    assert "  unexpected keys: norm.bias, norm.weight" in lines
    assert "global_pool" in lines[-1]
    cfg = linprobe.load_config(_cfg(fmnist, init=str(path), model=model))  # cls token: loads
    probe, report = linprobe.build_probe(cfg, 10)
    assert report["head_init"] == [] and report["dropped"] == []
    assert probe.head[1].in_features == 192


def _naive_top1(model, root) -> float:
    tf = eval_transform(32, 1.0)
    classes = sorted(p.name for p in (root / "val").iterdir())
    hits = total = 0
    with torch.no_grad():
        for target, name in enumerate(classes):
            for path in sorted((root / "val" / name).iterdir()):
                img = tf(Image.open(path).convert("RGB"))[None]
                hits += int(model(img).argmax(1).item() == target)
                total += 1
    return 100.0 * hits / total


def test_only_the_head_trains(fmnist, resnet_encoder, tmp_path):
    path, enc = resnet_encoder
    metrics = linprobe.run(linprobe.load_config(_cfg(fmnist, init=str(path))), tmp_path)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    state = saved["state_dict"]
    for key, value in enc.items():  # weights, running stats and num_batches_tracked
        assert torch.equal(state[f"backbone.{key}"], value), key
    assert set(state) == {f"backbone.{k}" for k in enc} | {
        "head.0.running_mean",
        "head.0.running_var",
        "head.0.num_batches_tracked",
        "head.1.weight",
        "head.1.bias",
    }
    assert state["head.0.num_batches_tracked"] == 10  # the probe's own BN did run
    torch.manual_seed(0)
    fresh, _ = linprobe.build_probe(linprobe.load_config(_cfg(fmnist, init=str(path))), 10)
    assert not torch.equal(fresh.head[1].weight, state["head.1.weight"])

    resolved = yaml.safe_load((tmp_path / "resolved_config.yaml").read_text())
    assert resolved["derived"]["lr"] == pytest.approx(0.1)
    assert resolved["derived"]["feature_dim"] == 512
    assert resolved["derived"]["init"]["sha256"] == saved["meta"]["init_sha256"]
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 100.0
    model, meta = load_classifier(tmp_path / "model.pt")
    assert meta["stage"] == "linprobe" and meta["num_classes"] == 10
    assert _naive_top1(model, fmnist) == pytest.approx(metrics["top1"])
    assert metrics["top1_final"] == metrics["top1"] and "top1_best_last10" not in metrics
    final = predictions.read(tmp_path / "predictions" / "final.npz")  # for the paired statistics
    assert final.kind == "classification" and final.meta["stage"] == "linprobe"
    assert final.score() == pytest.approx(metrics["top1"])
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == [
        "epoch_0002.npz", "final.npz"
    ]  # fmt: skip


def test_probe_keeps_the_backbone_in_eval_mode():
    backbone = timm.create_model("resnet18", num_classes=0)
    probe = LinearProbe(backbone, 10).train()
    assert probe.training and probe.head.training
    assert not any(m.training for m in probe.backbone.modules())
    assert not any(p.requires_grad for p in probe.backbone.parameters())
    x = torch.randn(4, 3, 32, 32)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    probe(x).sum().backward()
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in before.items())
    assert probe.head[1].weight.grad is not None
    assert all(p.grad is None for p in backbone.parameters())


def test_resume_is_bit_identical(fmnist, resnet_encoder, tmp_path):
    path, _ = resnet_encoder
    cfg = linprobe.load_config(_cfg(fmnist, init=str(path), epochs=3))
    full = linprobe.run(cfg, tmp_path / "full")
    assert linprobe.run(cfg, tmp_path / "cut", stop_after_steps=11) == {"stopped_at_step": 11.0}
    # step 10 ends epoch 2: its checkpoint follows the epoch's evaluation, which the stop
    # pre-empts, so the restart goes back to step 9 and must still evaluate epoch 2
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 9
    torch.manual_seed(7)
    resumed = linprobe.run(cfg, tmp_path / "cut")
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key

    def strip(p):
        rows = [json.loads(x) for x in p.read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]

    assert strip(tmp_path / "full" / "metrics.jsonl") == strip(tmp_path / "cut" / "metrics.jsonl")
    assert full == resumed
    with pytest.raises(ConfigError, match="different config"):
        linprobe.run(
            linprobe.load_config(_cfg(fmnist, init=str(path), epochs=3, seed=1)), tmp_path / "cut"
        )


def test_cli_init_overrides_the_config(fmnist, resnet_encoder, tmp_path):
    import subprocess
    import sys

    path, _ = resnet_encoder
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg(fmnist, epochs=1)))
    cmd = [sys.executable, "-m", "a2mim.cli", "linprobe", "--config", str(cfg_file)]
    res = subprocess.run(
        [*cmd, "--out", str(tmp_path / "a"), "--init", str(path), "--set", "optim.base_lr=0.05"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load((tmp_path / "a" / "resolved_config.yaml").read_text())
    assert resolved["init"] == str(path) and resolved["optim"]["base_lr"] == 0.05
    assert json.loads(res.stdout) == json.loads((tmp_path / "a" / "metrics.json").read_text())
    res = subprocess.run(
        [*cmd, "--out", str(tmp_path / "b"), "--init", str(tmp_path / "a" / "model.pt")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "output of stage 'linprobe'" in res.stderr

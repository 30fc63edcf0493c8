"""The detect stage (Mask R-CNN) on real toy scenes (Fashion-MNIST items on photos): config
errors, the shared timm bodies (ViT windows / relative position bias against timm's own forward,
ResNet stages against the adapter), the solver (detectron2's warm-up + steps, weight-decay and
layer-decay groups), COCO evaluation with an oracle, short torchvision runs for every
architecture, exact resume, the missing-detectron2 message through the CLI, and the detectron2
backend (skipped unless detectron2 is importable)."""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest
import timm
import torch
import yaml

from a2mim import cli, predictions, recipes
from a2mim.config import ConfigError
from a2mim.data.coco import CocoInstances
from a2mim.data.scenes import make_scenes
from a2mim.detection import (
    DETECTRON2_INSTALL,
    BackendUnavailable,
    check_backend,
    detectron2_available,
    resolve_backend,
)
from a2mim.detection.backbone import (
    RelativePositionBias,
    StagedBody,
    ViTBody,
    build_body,
    convert_norm,
    create_encoder,
    vit_layer_id,
)
from a2mim.detection.precise_bn import update_bn_stats
from a2mim.detection.spec import DetectorSpec
from a2mim.detection.torchvision_backend import TorchvisionMaskRCNN
from a2mim.stages import detect
from a2mim.train import checkpoint

VIT = {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": {"depth": 3}, "img_size": 64}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes") / "s"
    make_scenes(root, n_train=16, n_val=6, img_size=64, scale=(1.0, 1.6))
    return root


def _cfg(root, **over) -> dict:
    cfg = {
        "scale": "tiny",
        "backend": "torchvision",
        "model": {
            "backbone": "resnet18",
            "img_size": 32,
            "arch": "fpn",
            "norm": "bn",
            "fpn_channels": 32,
            "anchor_sizes": [16, 32, 64, 128, 256],
            "rpn_pre_nms_topk_train": 100,
            "rpn_post_nms_topk_train": 40,
            "rpn_pre_nms_topk_test": 100,
            "rpn_post_nms_topk_test": 40,
            "roi_batch_per_image": 16,
            "box_fc_dim": 64,
            "mask_conv_dim": 32,
            "mask_num_conv": 1,
            "detections_per_image": 10,
        },
        "input": {
            "min_size_train": [56, 64],
            "max_size_train": 96,
            "min_size_test": 64,
            "max_size_test": 96,
        },
        "data": {
            "root": str(root / "coco"),  # a COCO 2017 layout: no path keys
            "val_limit": 3,
        },
        "solver": {
            "base_lr": 0.01,
            "lr_batch_divisor": 2,
            "max_iter": 4,
            "steps": [3],
            "warmup_iters": 2,
        },
        "batch_size": 2,
        "ckpt_every_steps": 2,
        "log_every_steps": 1,
        "progress": False,
        "track": False,
    }
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and key in cfg else value
    return cfg


def _encoder_pt(tmp_path, backbone="resnet18", kwargs=None, img_size=32) -> tuple:
    """A pretrain-format ``encoder.pt`` (timm keys + meta) of a random timm encoder."""
    model = timm.create_model(backbone, num_classes=0, **(kwargs or {}))
    path = tmp_path / "encoder.pt"
    meta = {
        "stage": "pretrain",
        "backbone": backbone,
        "backbone_kwargs": kwargs or {},
        "img_size": img_size,
        "preset": "a2mim_resnet18",
    }
    checkpoint.atomic_save({"state_dict": model.state_dict(), "meta": meta}, path)
    return path, model.state_dict()


# ----------------------------------------------------------------------------- config


def test_config_errors(scenes):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['ancor_sizes'\]"):
        detect.load_config(_cfg(scenes, model={"ancor_sizes": [32]}))
    with pytest.raises(ConfigError, match=r"one size per pyramid level P2-P6 \(5\)"):
        detect.load_config(_cfg(scenes, model={"anchor_sizes": [32, 64]}))
    with pytest.raises(ConfigError, match=r"frozen_bn without init .* use norm: bn"):
        detect.load_config(_cfg(scenes, model={"norm": "frozen_bn"}))
    with pytest.raises(ConfigError, match=r"layer_decay .* needs a ViT"):
        detect.load_config(_cfg(scenes, solver={"layer_decay": 0.7}))
    with pytest.raises(ConfigError, match=r"rel_pos_bias are ViT \(arch sfp\) options"):
        detect.load_config(_cfg(scenes, model={"rel_pos_bias": True}))
    with pytest.raises(ConfigError, match=r"solver\.steps must increase"):
        detect.load_config(_cfg(scenes, solver={"steps": [3, 2]}))
    with pytest.raises(ConfigError, match=r"backend: 'mmdet' is not one of"):
        detect.load_config(_cfg(scenes, backend="mmdet"))
    with pytest.raises(ConfigError, match="stride-16 map"):
        build_body(
            DetectorSpec(**{**VIT, "backbone_kwargs": {"patch_size": 8}}, arch="sfp"), None, 64
        )


# ----------------------------------------------------------------------------- bodies


def _vit_encoder() -> torch.nn.Module:
    spec = DetectorSpec(**VIT, arch="sfp")
    return create_encoder(spec, None)[0].eval()


def _timm_without_cls(encoder: torch.nn.Module, img: torch.Tensor) -> torch.Tensor:
    """timm's own forward_features with the cls token masked out of every attention (what
    dropping it after the position embedding computes), patch tokens as (B, C, h, w)."""
    n = (img.shape[-2] // 16) * (img.shape[-1] // 16)
    mask = torch.zeros(1, 1, n + 1, n + 1)
    mask[..., 0] = float("-inf")
    mask[..., 0, 0] = 0.0  # the cls query keeps one key (its output is dropped anyway)
    tokens = encoder.forward_features(img, attn_mask=mask)[:, 1:]
    return tokens.transpose(1, 2).reshape(
        img.shape[0], -1, img.shape[-2] // 16, img.shape[-1] // 16
    )


def test_vit_body_global_equals_timm_forward():
    """Global attention, no bias: the body is timm's own forward_features (position embedding
    resampled to the grid) with the cls token dropped, at a size other than img_size."""
    encoder = _vit_encoder()
    body = ViTBody(encoder, None, (), rel_pos_bias=False, rel_pos_extent=8).eval()
    img = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        ours = body(img)["last"]
        ref = _timm_without_cls(encoder, img)
    assert ours.shape == (2, 192, 3, 5)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_vit_windows_isolate_and_cover():
    encoder = _vit_encoder()
    img = torch.randn(1, 3, 80, 80)  # 5x5 tokens: 3x3 windows pad to 6x6
    windowed = ViTBody(encoder, 3, (), rel_pos_bias=False, rel_pos_extent=8).eval()
    with torch.no_grad():
        base = windowed(img)["last"]
        changed = img.clone()
        changed[..., 64:, 64:] += 1.0  # token (4, 4): window (1, 1)
        after = windowed(changed)["last"]
        # a window as large as the grid is global attention
        whole = ViTBody(encoder, 5, (), rel_pos_bias=False, rel_pos_extent=8).eval()
        torch.testing.assert_close(
            whole(img)["last"], _timm_without_cls(encoder, img), atol=1e-5, rtol=0
        )
    moved = (after - base).abs().amax(dim=1)[0]  # (5, 5)
    assert moved[3:, 3:].min() > 0  # the whole window sees the change
    assert moved[:3].max() < 1e-6 and moved[:, :3].max() < 1e-6  # other windows do not


def test_relative_position_bias_golden():
    rpb = RelativePositionBias(extent=3, num_heads=2)
    with torch.no_grad():
        rpb.relative_position_bias_table.copy_(torch.arange(50.0).view(25, 2))
    bias = rpb(2, 3)  # tokens (y, x) row-major
    assert bias.shape == (1, 2, 6, 6)
    # entry (i, j) is table[(dy + 2) * 5 + (dx + 2)] with dy = y_i - y_j, dx = x_i - x_j
    for i in range(6):
        for j in range(6):
            dy, dx = i // 3 - j // 3, i % 3 - j % 3
            row = (dy + 2) * 5 + dx + 2
            assert bias[0, :, i, j].tolist() == [2.0 * row, 2.0 * row + 1]
    with pytest.raises(ValueError, match="exceeds the relative position bias extent 3"):
        rpb(4, 1)
    # zero init leaves attention unchanged; a non-zero table changes the output
    encoder = _vit_encoder()
    img = torch.randn(1, 3, 64, 64)
    plain = ViTBody(encoder, None, (), rel_pos_bias=False, rel_pos_extent=4).eval()
    biased = ViTBody(encoder, 2, (1,), rel_pos_bias=True, rel_pos_extent=4).eval()
    windowed = ViTBody(encoder, 2, (1,), rel_pos_bias=False, rel_pos_extent=4).eval()
    with torch.no_grad():
        torch.testing.assert_close(biased(img)["last"], windowed(img)["last"])
        biased.rel_pos[1].relative_position_bias_table.normal_()
        assert not torch.allclose(biased(img)["last"], windowed(img)["last"])
        assert not torch.allclose(plain(img)["last"], windowed(img)["last"])


def test_staged_body_stages_and_c4(tmp_path):
    path, weights = _encoder_pt(tmp_path)
    spec = DetectorSpec(backbone="resnet18", img_size=32, arch="c4", norm="bn")
    body, report = build_body(spec, str(path), 96)
    assert isinstance(body, StagedBody) and report["loaded"] == len(weights)
    assert list(body.specs) == ["res2", "res3", "res4"]
    assert [(s.channels, s.stride) for s in body.specs.values()] == [(64, 4), (128, 8), (256, 16)]
    assert body.res5 is body.encoder.layer4 and body.res5_channels == 512
    torch.testing.assert_close(body.res5[0].conv1.weight, weights["layer4.0.conv1.weight"])
    feats = body(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "res2": (1, 64, 16, 24),
        "res3": (1, 128, 8, 12),
        "res4": (1, 256, 4, 6),
    }


def test_frozen_bn_keeps_statistics(tmp_path):
    path, weights = _encoder_pt(tmp_path)
    encoder, _ = create_encoder(DetectorSpec(backbone="resnet18", img_size=32), str(path))
    ref = timm.create_model("resnet18", num_classes=0)
    ref.load_state_dict(weights)
    convert_norm(encoder, "frozen_bn").train()
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(img), ref.eval()(img))  # train mode == eval stats
    assert not any("bn" in n for n, _ in encoder.named_parameters())


# ----------------------------------------------------------------------------- solver


def test_lr_factor_golden():
    solver = detect.SolverConfig(warmup_iters=10, warmup_factor=0.001, steps=(20, 30), gamma=0.1)
    assert detect.lr_factor(0, solver) == pytest.approx(0.001)
    assert detect.lr_factor(5, solver) == pytest.approx(0.001 * 0.5 + 0.5)
    assert detect.lr_factor(10, solver) == 1.0
    assert detect.lr_factor(19, solver) == 1.0
    assert detect.lr_factor(20, solver) == pytest.approx(0.1)
    assert detect.lr_factor(35, solver) == pytest.approx(0.01)


def test_param_groups_decay_and_layer_decay():
    spec = DetectorSpec(
        **VIT, arch="sfp", window_size=2, rel_pos_bias=True, anchor_sizes=(16, 32, 64, 128, 256)
    )
    from a2mim.detection.torchvision_backend import TorchvisionMaskRCNN

    model = TorchvisionMaskRCNN(spec, detect.Input(max_size_train=96, max_size_test=96), 3)
    solver = detect.SolverConfig(opt="adamw", weight_decay=0.1, layer_decay=0.5)
    groups = detect.param_groups(model, solver, vit_depth=3)
    where = {id(p): (g["weight_decay"], g["lr_scale"]) for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    enc = "net.backbone.body.encoder."
    assert where[id(params[enc + "pos_embed"])] == (0.0, 0.5**4)
    assert where[id(params[enc + "patch_embed.proj.weight"])] == (0.1, 0.5**4)
    assert where[id(params[enc + "blocks.0.norm1.weight"])] == (0.0, 0.5**3)
    assert where[id(params[enc + "blocks.2.attn.qkv.weight"])] == (0.1, 0.5**1)
    table = "net.backbone.body.rel_pos.1.relative_position_bias_table"
    assert where[id(params[table])] == (0.0, 0.5**2)
    assert where[id(params["net.roi_heads.box_head.fc6.weight"])] == (0.1, 1.0)
    assert where[id(params["net.roi_heads.box_head.fc6.bias"])] == (0.1, 1.0)  # detectron2
    assert vit_layer_id("net.backbone.body.encoder.norm.weight", 3) == 4
    assert len(where) == len(params)


# ----------------------------------------------------------------------------- evaluation


class _Oracle(torch.nn.Module):
    """Predicts the ground truth of each image (identified by its pixels)."""

    def __init__(self, dataset: CocoInstances):
        super().__init__()
        self.truth = [dataset[i] for i in range(len(dataset))]

    def forward(self, images):
        preds = []
        for img in images:
            _, target = next(t for t in self.truth if torch.equal(t[0], img))
            n = len(target["labels"])
            preds.append(
                {
                    "boxes": target["boxes"],
                    "scores": torch.linspace(1.0, 0.5, n),
                    "labels": target["labels"],
                    "masks": target["masks"].bool(),
                }
            )
        return preds


def test_evaluate_detector_with_an_oracle(scenes):
    val = CocoInstances(scenes / "coco/annotations/instances_val2017.json", scenes / "coco/val2017")
    oracle = _Oracle(val)
    full = detect.evaluate_detector(oracle, val, torch.device("cpu"), batch_size=4)
    for key in ("ap_box", "ap50_box", "ap75_box", "ap_mask", "ap50_mask", "ap75_mask"):
        assert full[key] == pytest.approx(100.0), key
    assert full["detections"] == len(val.coco.anns)
    evaluators: dict = {}
    part = detect.evaluate_detector(
        oracle, val, torch.device("cpu"), limit=2, evaluators=evaluators
    )
    assert part["ap_mask"] == pytest.approx(100.0)  # the ground truth is cut to the 2 images
    # the per-image matches the audit's bootstrap uses give COCOeval's AP back
    found = predictions.detection_from_cocoeval(evaluators)
    assert sorted(evaluators) == ["bbox", "segm"] and len(found.ids) == 2
    assert found.ap("bbox") == pytest.approx(part["ap_box"])
    assert found.ap("segm") == pytest.approx(part["ap_mask"])


def test_hflip_golden():
    img = torch.arange(12.0).view(1, 3, 4)
    masks = torch.zeros(1, 3, 4, dtype=torch.uint8)
    masks[0, :, 0] = 1
    target = {"boxes": torch.tensor([[0.0, 0.0, 1.0, 3.0]]), "masks": masks}
    flipped, out = detect.hflip(img, target)
    assert flipped[0, 0].tolist() == [3.0, 2.0, 1.0, 0.0]
    assert out["boxes"].tolist() == [[3.0, 0.0, 4.0, 3.0]]
    assert out["masks"][0, :, 3].tolist() == [1, 1, 1] and out["masks"].sum() == 3


# ----------------------------------------------------------------------------- runs


@pytest.mark.parametrize(
    "model",
    [
        {"arch": "c4", "extra_res5_norm": True},
        {**VIT, "arch": "sfp", "window_size": 2, "global_blocks": [1], "rel_pos_bias": True},
    ],
    ids=["c4", "vit_sfp"],
)
def test_torchvision_architectures_train_and_evaluate(scenes, tmp_path, model):
    cfg = detect.load_config(_cfg(scenes, model=model, solver={"max_iter": 2}))
    metrics = detect.run(cfg, tmp_path)
    assert metrics["backend"] == "torchvision"
    assert all(np.isfinite(metrics[k]) for k in ("ap_box", "ap_mask", "final_loss"))


def test_run_writes_metrics_and_model(scenes, tmp_path):
    path, weights = _encoder_pt(tmp_path)
    cfg = detect.load_config(
        _cfg(
            scenes,
            init=str(path),
            model={"norm": "frozen_bn"},
            solver={"max_iter": 3},
            track=True,
            tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        )
    )
    out = tmp_path / "run"
    metrics = detect.run(cfg, out)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics and saved["backend"] == "torchvision"
    keys = {"ap_box", "ap50_box", "ap75_box", "ap_mask", "ap50_mask", "ap75_mask"}
    assert keys <= set(saved) and all(0.0 <= saved[k] <= 100.0 for k in keys)
    derived = yaml.safe_load((out / "resolved_config.yaml").read_text())["derived"]
    assert derived["backend"] == "torchvision" and derived["init"]["loaded"] == len(weights)
    assert derived["deterministic"] is True  # null: deterministic on the CPU
    assert derived["eval_precision"] == "fp32" and derived["norm"] == "frozen_bn"
    # frozen BN: the pretrained statistics are still those of the encoder
    model, meta = detect.load_detector(out / "model.pt")
    body = model.net.backbone.body.encoder
    torch.testing.assert_close(body.bn1.running_var, weights["bn1.running_var"])
    assert meta["backend"] == "torchvision" and meta["init"] == str(path)
    # the reloaded model reproduces the run's evaluation
    val = CocoInstances(scenes / "coco/annotations/instances_val2017.json", scenes / "coco/val2017")
    again = detect.evaluate_detector(model, val, torch.device("cpu"), limit=3)
    assert {k: again[k] for k in keys} == pytest.approx({k: metrics[k] for k in keys})
    # the final evaluation's per-image matches, for the audit's bootstrap over images
    found = predictions.read(out / "predictions" / "final.npz")
    assert found.kind == "detection" and found.meta["step"] == 3
    assert found.ap("bbox") == pytest.approx(metrics["ap_box"])
    assert found.ap("segm") == pytest.approx(metrics["ap_mask"])

    from mlflow.tracking import MlflowClient

    run_id = (out / "mlflow_run_id").read_text().strip()
    tags = MlflowClient(tracking_uri=cfg.tracking_uri).get_run(run_id).data.tags
    assert tags["backend"] == "torchvision" and tags["stage"] == "detect"
    assert tags["method"] == "a2mim"
    artifacts = MlflowClient(tracking_uri=cfg.tracking_uri).list_artifacts(run_id, "predictions")
    assert [a.path for a in artifacts] == ["predictions/final.npz"]


def test_resume_is_bit_identical(scenes, tmp_path):
    cfg = detect.load_config(_cfg(scenes, solver={"max_iter": 5}))
    full = detect.run(cfg, tmp_path / "full")
    assert detect.run(cfg, tmp_path / "cut", stop_after_steps=3) == {"stopped_at_step": 3.0}
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 2
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    resumed = detect.run(cfg, tmp_path / "cut")
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 5
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key

    def strip(path):
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]

    assert strip(tmp_path / "full" / "metrics.jsonl") == strip(tmp_path / "cut" / "metrics.jsonl")
    assert full == resumed
    with pytest.raises(ConfigError, match="different config"):
        detect.run(
            detect.load_config(_cfg(scenes, solver={"max_iter": 5}, seed=1)), tmp_path / "cut"
        )


@pytest.mark.skipif(detectron2_available(), reason="detectron2 is installed here")
def test_cli_without_detectron2_says_how_to_install(scenes, tmp_path, capsys):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg(scenes)))
    argv = ["detect", "--config", str(cfg_file), "--out", str(tmp_path / "run")]
    assert cli.main([*argv, "--set", "backend=detectron2"]) == 2
    err = capsys.readouterr().err
    assert "a2mim detect: error: backend: detectron2 was requested" in err
    assert "pip install -U pip 'setuptools<82' ninja" in err
    assert "MAX_JOBS=2 pip install --no-build-isolation --no-deps -e" in err
    assert "facebookresearch/detectron2" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert resolve_backend("auto") == "torchvision"
    assert "setuptools<82" in DETECTRON2_INSTALL
    with pytest.raises(BackendUnavailable, match=r"set: \{backend: torchvision\}"):
        check_backend("detectron2")  # the pre-flight check names the switch
    assert check_backend("torchvision") == "torchvision"


@pytest.mark.slow
def test_tiny_recipe_beats_untrained(tmp_path):
    """The shipped tiny recipe, from scratch, on the workflow's tiny scenes (400 / 100 at
    128 px) against the same detector untrained (measured: box AP 6.1 vs 0.0, AP50 11.9)."""
    root = tmp_path / "scenes"
    make_scenes(root, n_train=400, n_val=100, img_size=128, seed=0)
    data = yaml.safe_load(recipes.resolve("detect", "tiny").read_text())
    data.update(progress=False, track=False)
    data["data"]["root"] = str(root / "coco")
    trained = detect.run(detect.load_config(data), tmp_path / "trained")
    data["solver"]["max_iter"] = 0
    untrained = detect.run(detect.load_config(data), tmp_path / "untrained")
    assert untrained["ap50_box"] < 1.0 and untrained["ap50_mask"] < 1.0
    assert trained["ap50_box"] > untrained["ap50_box"] + 5
    assert trained["ap_box"] > untrained["ap_box"] + 3
    assert trained["ap_mask"] > untrained["ap_mask"] + 3


# ----------------------------------------------------------------------------- detectron2


@pytest.fixture
def d2():
    return pytest.importorskip("detectron2")


@pytest.mark.parametrize(
    "model",
    [
        {"arch": "c4", "extra_res5_norm": True},
        {"arch": "fpn"},
        {**VIT, "arch": "sfp", "window_size": 2, "global_blocks": [1], "rel_pos_bias": True},
    ],
    ids=["c4", "fpn", "vit_sfp"],
)
def test_detectron2_architectures_train_and_evaluate(d2, scenes, tmp_path, model):
    cfg = detect.load_config(_cfg(scenes, backend="auto", model=model, solver={"max_iter": 2}))
    metrics = detect.run(cfg, tmp_path)
    assert metrics["backend"] == "detectron2"  # auto picks detectron2 when it is importable
    assert all(np.isfinite(metrics[k]) for k in ("ap_box", "ap_mask", "final_loss"))
    d2cfg = yaml.safe_load((tmp_path / "detectron2_config.yaml").read_text())
    assert d2cfg["MODEL"]["BACKBONE"]["FREEZE_AT"] == 0 and d2cfg["SOLVER"]["MAX_ITER"] == 2


def test_detectron2_c4_head_is_the_pretrained_res5(d2, tmp_path):
    from a2mim.detection.detectron2_backend import Detectron2MaskRCNN

    path, weights = _encoder_pt(tmp_path)
    spec = DetectorSpec(backbone="resnet18", img_size=32, arch="c4", norm="frozen_bn")
    model = Detectron2MaskRCNN(
        spec, detect.Input(max_size_train=96, max_size_test=96), 3, str(path)
    )
    res5 = model.net.roi_heads.res5
    assert res5 is model.net.backbone.a2mim_body.encoder.layer4
    torch.testing.assert_close(res5[1].conv2.weight, weights["layer4.1.conv2.weight"])
    assert model.net.roi_heads.box_predictor.cls_score.in_features == 512
    assert model.init_report["loaded"] == len(weights)


def test_detectron2_resume_is_bit_identical(d2, scenes, tmp_path):
    cfg = detect.load_config(_cfg(scenes, backend="detectron2", solver={"max_iter": 4}))
    full = detect.run(cfg, tmp_path / "full")
    detect.run(cfg, tmp_path / "cut", stop_after_steps=3)
    resumed = detect.run(cfg, tmp_path / "cut")
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert full == resumed


# ----------------------------------------------------------------------------- issue 13 items 10-12


def _scenes_with_empty_boxes(scenes, tmp_path):
    """A copy of the scenes' COCO root whose first training boxes have zero width / height or
    lie outside the image (COCO train2017 has such boxes)."""
    root = tmp_path / "coco"
    shutil.copytree(scenes / "coco", root)
    ann_file = root / "annotations" / "instances_train2017.json"
    data = json.loads(ann_file.read_text())
    anns = data["annotations"]
    anns[0]["bbox"][2] = 0.0
    anns[1]["bbox"][3] = 0.0
    width = data["images"][0]["width"]
    anns[2]["bbox"] = [width + 5.0, 3.0, 4.0, 4.0]  # outside: empty once clipped
    ann_file.write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("backend", ["torchvision", "detectron2"])
def test_empty_boxes_are_dropped_counted_and_train(scenes, tmp_path, backend):
    if backend == "detectron2":
        pytest.importorskip("detectron2")
    root = _scenes_with_empty_boxes(scenes, tmp_path)
    data = _cfg(scenes, backend=backend, model={"arch": "c4"}, solver={"max_iter": 2})
    data["data"]["root"] = str(root)
    cfg = detect.load_config(data)
    dataset = detect.FlippedInstances(
        CocoInstances(
            root / "annotations/instances_train2017.json", root / "train2017", with_polygons=True
        ),
        list(range(3)),
        0.0,
        0,
    )
    for i in range(3):
        img, target = dataset[(0, i)]
        boxes = target["boxes"]
        assert (boxes[:, 2] - boxes[:, 0] > 0).all() and (boxes[:, 3] - boxes[:, 1] > 0).all()
        assert len(target["polygons"]) == len(boxes) == len(target["labels"])
        assert "masks" not in target  # polygons only: the bitmaps are never decoded
        assert (boxes[:, 0::2] <= img.shape[-1]).all()
    metrics = detect.run(cfg, tmp_path / "run")
    assert np.isfinite(metrics["final_loss"])
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(v) for r in rows if "loss" in r for k, v in r.items() if "loss" in k)
    derived = yaml.safe_load((tmp_path / "run" / "resolved_config.yaml").read_text())["derived"]
    assert derived["empty_boxes"]["empty_boxes"] == 3


@pytest.mark.slow  # two torchrun processes: ~35 s on 2 shared cores
def test_sync_bn_on_cpu_processes_falls_back_to_bn(scenes, tmp_path):
    """``norm: sync_bn`` (the R50-C4 default) with 2 CPU processes: plain BatchNorm per process,
    recorded, instead of "SyncBatchNorm layers only work with GPU modules"."""
    import socket
    import subprocess
    import sys

    data = _cfg(scenes, model={"arch": "c4", "norm": "sync_bn"}, solver={"max_iter": 1})
    data.update(batch_size=1, device="cpu")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "a2mim.cli"]
    cmd += ["detect", "--config", str(cfg_file), "--out", str(tmp_path / "run")]
    res = subprocess.run(
        cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SyncBatchNorm needs CUDA" in res.stderr
    derived = yaml.safe_load((tmp_path / "run" / "resolved_config.yaml").read_text())["derived"]
    assert derived["world_size"] == 2 and derived["norm"] == "bn (sync_bn needs CUDA)"


def test_bf16_runs_evaluate_in_float32(scenes, tmp_path, monkeypatch):
    """Under bf16 autocast the heads would give bf16 scores (few distinct values, ties that
    COCOeval ranks arbitrarily): the evaluation forward runs without autocast."""
    seen = []
    forward = TorchvisionMaskRCNN.forward

    def spy(self, images, targets=None):
        out = forward(self, images, targets)
        if not self.training:
            seen.append((torch.is_autocast_enabled("cpu"), [p["scores"].dtype for p in out]))
        return out

    monkeypatch.setattr(TorchvisionMaskRCNN, "forward", spy)
    cfg = detect.load_config(_cfg(scenes, amp="bf16", solver={"max_iter": 1}))
    detect.run(cfg, tmp_path)
    assert seen and all(not autocast for autocast, _ in seen)
    assert {d for _, dtypes in seen for d in dtypes} <= {torch.float32}


def test_update_bn_stats_golden():
    """Precise BN: running statistics become the plain averages of the batch means and
    (unbiased) variances, the momentum and training mode come back."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3)).eval()
    batches = [torch.randn(4, 2, 5, 5) * (i + 1) for i in range(3)]
    with torch.no_grad():
        feats = [model[0](b) for b in batches]
    used = update_bn_stats(model, iter(batches), 5, model)
    assert used == 3 and not model.training and model[1].momentum == 0.1
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).flatten(1).var(1) for f in feats]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)
    assert update_bn_stats(torch.nn.Linear(2, 2), iter(batches), 5, model) == 0


def test_precise_bn_runs_before_evaluation(scenes, tmp_path):
    plain = detect.run(detect.load_config(_cfg(scenes, solver={"max_iter": 2})), tmp_path / "a")
    cfg = detect.load_config(_cfg(scenes, solver={"max_iter": 2}, precise_bn_iters=3))
    precise = detect.run(cfg, tmp_path / "b")
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    stats = [k for k in a if k.endswith("running_mean")]
    assert stats and all(not torch.equal(a[k], b[k]) for k in stats)
    weights = [k for k in a if k.endswith(".weight")]
    assert all(torch.equal(a[k], b[k]) for k in weights)  # only the statistics differ
    assert plain["final_loss"] == precise["final_loss"]


def test_detectron2_config_describes_the_network(d2, tmp_path):
    """The paper recipe's detectron2 config (saved with the run): MoCo's C4 protocol."""
    from a2mim.detection.detectron2_backend import Detectron2MaskRCNN

    data = yaml.safe_load(recipes.resolve("detect", "r50_c4_2x").read_text())
    cfg = detect.load_config(data)
    model = Detectron2MaskRCNN(cfg.model, cfg.input, 80, world_size=8)
    text = model.config_yaml(detect.solver_summary(cfg, 0.02, 16))
    d2cfg = yaml.safe_load(text)
    m = d2cfg["MODEL"]
    assert m["BACKBONE"]["FREEZE_AT"] == 0 and m["RESNETS"]["NORM"] == "SyncBN"
    assert m["ROI_HEADS"]["NAME"] == "Res5ROIHeadsExtraNorm"
    assert isinstance(model.net.roi_heads.res5.norm, torch.nn.SyncBatchNorm)
    assert m["RESNETS"]["STRIDE_IN_1X1"] is False and m["RPN"]["PRE_NMS_TOPK_TEST"] == 6000
    assert d2cfg["INPUT"]["MAX_SIZE_TRAIN"] == 1200 and d2cfg["INPUT"]["MIN_SIZE_TEST"] == 800
    sol = d2cfg["SOLVER"]
    assert (sol["BASE_LR"], sol["IMS_PER_BATCH"], sol["MAX_ITER"]) == (0.02, 16, 180000)
    assert list(sol["STEPS"]) == [120000, 160000] and sol["WARMUP_ITERS"] == 1000
    assert d2cfg["TEST"]["PRECISE_BN"] == {"ENABLED": True, "NUM_ITER": 200}
    assert model.net.backbone.size_divisibility == 0  # C4: padded to the batch maximum
    one = Detectron2MaskRCNN(cfg.model, cfg.input, 80, world_size=1)
    assert one.cfg.MODEL.RESNETS.NORM == "BN"  # one process: sync_bn is plain BN


def test_resize_matches_pil():
    """Both backends resize as detectron2's pipeline does (PIL on the 8-bit image)."""
    from PIL import Image

    from a2mim.detection.resize import resize_shortest_edge

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
    img = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0
    masks = torch.from_numpy(rng.integers(0, 2, (1, 120, 90), dtype=np.uint8))
    target = {"boxes": torch.tensor([[9.0, 12.0, 45.0, 60.0]]), "masks": masks}
    target["polygons"] = [[np.array([9.0, 12.0, 45.0, 12.0, 45.0, 60.0])]]
    for short, max_size in ((60, 1000), (150, 170)):
        out, t = resize_shortest_edge(img, target, short, max_size)
        h, w = out.shape[-2:]
        pil = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
        ours = (out * 255).round().byte().permute(1, 2, 0).numpy()
        assert np.abs(ours.astype(int) - pil).max() <= 2 and (ours == pil).mean() > 0.9
        pil_mask = np.asarray(Image.fromarray(masks[0].numpy()).resize((w, h), Image.NEAREST))
        assert (t["masks"][0].numpy() == pil_mask).mean() > 0.9
        sx, sy = w / 90, h / 120
        torch.testing.assert_close(t["boxes"], torch.tensor([[9 * sx, 12 * sy, 45 * sx, 60 * sy]]))
        np.testing.assert_allclose(t["polygons"][0][0][:2], [9 * sx, 12 * sy])
    spec = DetectorSpec(backbone="resnet18", img_size=32, arch="c4", norm="bn")
    inputs = detect.Input(min_size_test=60, max_size_test=1000)
    tv = TorchvisionMaskRCNN(spec, inputs, 3).eval()
    batch, _ = tv.net.transform([img])
    out, _ = resize_shortest_edge(img, None, 60, 1000)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert batch.image_sizes == [(80, 60)] and batch.tensors.shape[-2:] == (80, 60)  # C4: no /32
    torch.testing.assert_close(batch.tensors[0], (out - mean) / std)
    # input.resize: float keeps torchvision's own transform (the toy recipes' measurements)
    plain = TorchvisionMaskRCNN(spec, detect.Input(resize="float"), 3)
    assert type(plain.net.transform).__name__ == "GeneralizedRCNNTransform"
    flat, _ = resize_shortest_edge(img, None, 60, 1000, mode="float")
    expect = torch.nn.functional.interpolate(img[None], (80, 60), mode="bilinear")[0]
    torch.testing.assert_close(flat, expect)


def test_detectron2_trains_masks_from_polygons(d2, scenes):
    """COCO polygons reach detectron2 as ``PolygonMasks`` (rasterised per RoI, as its own
    loader gives them), scaled with the image; an RLE-only instance falls back to bitmaps."""
    from detectron2.structures import BitMasks, PolygonMasks

    from a2mim.detection.detectron2_backend import Detectron2MaskRCNN

    spec = DetectorSpec(backbone="resnet18", img_size=32, arch="c4", norm="bn")
    model = Detectron2MaskRCNN(spec, detect.Input(min_size_train=(128,), max_size_train=256), 10)
    root = scenes / "coco"
    data = CocoInstances(
        root / "annotations/instances_train2017.json", root / "train2017", with_polygons=True
    )
    img, target = data[0]
    (item,) = model.train()._batch([img], [target])
    masks = item["instances"].gt_masks
    assert isinstance(masks, PolygonMasks) and len(masks) == len(target["labels"])
    first = target["polygons"][0][0]
    np.testing.assert_allclose(masks.polygons[0][0], first * 2.0)  # 64 -> 128 px
    target["polygons"][0] = None
    target["masks"] = CocoInstances(
        root / "annotations/instances_train2017.json", root / "train2017"
    ).load_target(data.ids[0])["masks"]
    (item,) = model._batch([img], [target])
    assert isinstance(item["instances"].gt_masks, BitMasks)

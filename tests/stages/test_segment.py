"""The segment stage (UperNet) on generated scenes: metrics against hand-computed values, config
errors, strict encoder loading (wrong checkpoint, ViT position-embedding resampling), layer-wise
lr decay groups, the mmseg pipeline and sliding-window inference, a short run checked against an
independent evaluation of its saved model, and exact resume (stop_after_steps in process, SIGKILL
of a real CLI process)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

from a2mim import recipes
from a2mim.cli import build_parser
from a2mim.config import ConfigError, to_dict
from a2mim.data.scenes import ADE_NUM_CLASSES, make_scenes
from a2mim.data.seg_transforms import SegTrainTransform, eval_input, rescale_size
from a2mim.mim import MaskedImageModel, get_preset
from a2mim.models.upernet import build_upernet, load_init, param_groups, slide_logits
from a2mim.stages import segment
from a2mim.train import checkpoint
from a2mim.train.encoder import create_classifier

VIT = get_preset("a2mim_vit_tiny")  # vit_tiny_patch16_224, patch 4, depth 6, 32 px


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """A small ADE-layout scene set: 64 px, 12 train and 4 val images, 11 classes."""
    out = tmp_path_factory.mktemp("scenes") / "set"
    make_scenes(out, n_train=12, n_val=4, img_size=64, scale=(0.9, 1.3), seed=3)
    return out / "ade"


def _cfg(root, **top) -> dict:
    cfg = {
        "scale": "tiny",
        "model": {"backbone": "resnet18", "channels": 32, "aux_channels": 16},
        "data": {
            "root": str(root),
            "num_classes": ADE_NUM_CLASSES,
            "img_scale": [128, 48],
            "crop_size": 48,
            "num_workers": 0,
        },
        "optim": {"base_lr": 1e-3, "lr_batch_divisor": 4, "warmup_iters": 2},
        "iters": 6,
        "batch_size": 4,
        "ckpt_every_steps": 2,
        "log_every_steps": 1,
        "progress": False,
        "track": False,
    }
    for key, value in top.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and key in cfg else value
    return cfg


def _save_encoder(path, backbone: str, kwargs: dict, img_size: int, seed: int = 0, **meta):
    """An encoder.pt as ``a2mim pretrain`` writes it (timm keys of a classifier without head)."""
    torch.manual_seed(seed)
    model = create_classifier(backbone, 0, img_size, kwargs)
    state = {
        k: v + 0.01 * torch.rand_like(v.float()).to(v.dtype) for k, v in model.state_dict().items()
    }
    info = {
        "stage": "pretrain",
        "backbone": backbone,
        "backbone_kwargs": kwargs,
        "img_size": img_size,
    }
    checkpoint.atomic_save({"state_dict": state, "meta": {**info, **meta}}, path)
    return state


# ------------------------------------------------------------------------------------ metrics


def test_miou_matches_hand_computed_macro_iou():
    """4 classes; class 2 is in neither labels nor predictions, class 3 only predicted; two
    labels are 255 (ignored, whatever is predicted there)."""
    pred = torch.tensor([[0, 0, 1, 1], [3, 3, 0, 1]])
    label = torch.tensor([[0, 255, 1, 0], [1, 255, 0, 1]])
    # labelled pixels (pred, label): (0,0) (1,1) (1,0) (3,1) (0,0) (1,1)
    # IoU: class 0 = 2 / 3, class 1 = 2 / 4, class 2 absent (left out), class 3 = 0 / 1
    expected_miou = 100 * (2 / 3 + 2 / 4 + 0) / 3
    expected_aacc = 100 * 4 / 6
    expected_macc = 100 * (2 / 3 + 2 / 3) / 2  # recall of classes 0 and 1; 2, 3 unlabelled
    metrics = segment.SegMetrics(4, ignore_index=255)
    metrics.update(pred[:1], label[:1])  # counts accumulate over updates
    metrics.update(pred[1:], label[1:])
    res = metrics.compute()
    assert res["miou"] == pytest.approx(expected_miou)
    assert res["aacc"] == pytest.approx(expected_aacc)
    assert res["macc"] == pytest.approx(expected_macc)
    assert res["iou_per_class"][:2] == pytest.approx([200 / 3, 50.0])
    assert math.isnan(res["iou_per_class"][2]) and res["iou_per_class"][3] == 0.0
    # the per-class mean of torchmetrics' average="none" counts the absent class as 0
    none = MulticlassJaccardIndex(4, average="none", ignore_index=255)(pred, label)
    assert 100 * float(none.mean()) == pytest.approx(100 * (2 / 3 + 2 / 4) / 4)


def test_loss_averages_like_mmseg():
    logits = torch.randn(1, 3, 2, 2)
    label = torch.tensor([[[0, 255], [2, 1]]])
    per_pixel = torch.nn.functional.cross_entropy(logits, label, ignore_index=255, reduction="none")
    assert segment.seg_loss(logits, label, 255, False) == pytest.approx(float(per_pixel.sum()) / 4)
    assert segment.seg_loss(logits, label, 255, True) == pytest.approx(float(per_pixel.sum()) / 3)


# ----------------------------------------------------------------------------- config errors


def test_config_errors_name_the_problem(scenes):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['iter'\].*did you mean 'iters'"):
        segment.load_config({**_cfg(scenes), "iter": 3})
    with pytest.raises(ConfigError, match=r"'resnet5' is not a timm model"):
        segment.load_config(_cfg(scenes, model={"backbone": "resnet5"}))
    with pytest.raises(ConfigError, match=r"warmup_iters must be in \[0, iters=6\)"):
        segment.load_config(_cfg(scenes, optim={"warmup_iters": 6}))
    with pytest.raises(ConfigError, match=r"eval\.stride must be in"):
        segment.load_config(_cfg(scenes, eval={"mode": "slide", "stride": 100}))
    with pytest.raises(ConfigError, match="batch_size must be >= 2"):
        segment.load_config(_cfg(scenes, batch_size=1))
    with pytest.raises(ConfigError, match="out_indices needs 4"):
        segment.load_config(_cfg(scenes, model={"out_indices": [1, 2, 3]}))


def test_recipes_and_cli_parse():
    for name in recipes.available("segment"):
        cfg = segment.load_config(yaml.safe_load(recipes.resolve("segment", name).read_text()))
        assert cfg.scale in ("tiny", "small", "paper"), name
    assert {"tiny", "small", "upernet_r50_160k", "upernet_vitb_160k"} <= set(
        recipes.available("segment")
    )
    args = build_parser().parse_args(["segment", "--config", "tiny", "--out", "x", "--init", "e"])
    assert args.command == "segment" and str(args.init) == "e"


# ---------------------------------------------------------------------------- encoder loading


def test_wrong_checkpoint_is_a_clear_error(scenes, tmp_path):
    bad = tmp_path / "encoder.pt"
    _save_encoder(bad, "resnet34", {}, 32)
    cfg = segment.load_config(_cfg(scenes, init=str(bad)))
    with pytest.raises(ValueError) as err:
        segment.run(cfg, tmp_path / "run")
    msg = str(err.value)
    assert "unexpected keys: layer1.2." in msg  # resnet34 has 3 blocks in layer1, resnet18 2
    assert "'backbone': 'resnet34'" in msg and "'backbone': 'resnet18'" in msg
    assert not (tmp_path / "run" / "checkpoint.pt").exists()

    model = build_upernet("resnet18", 11, 48, channels=16, aux_channels=16)
    clf = timm.create_model("resnet18", num_classes=10)
    checkpoint.atomic_save({"state_dict": clf.state_dict(), "meta": {"stage": "linprobe"}}, bad)
    with pytest.raises(ValueError, match="output of stage 'linprobe'"):
        load_init(model, bad, "resnet18")
    # A fine-tuned classifier is a supervised encoder (the "(Sup.)" rows): every backbone weight
    # is the classifier's, its fc head is removed.
    checkpoint.atomic_save({"state_dict": clf.state_dict(), "meta": {"stage": "finetune"}}, bad)
    report = load_init(model, bad, "resnet18")
    assert report["supervised"]["removed"] == ["fc.bias", "fc.weight"]
    trained = clf.state_dict()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, trained[key]), key
    checkpoint.atomic_save({"weights": clf.state_dict()}, bad)
    with pytest.raises(ValueError, match="not an encoder checkpoint"):
        load_init(model, bad, "resnet18")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        segment.run(segment.load_config(_cfg(scenes, init=str(tmp_path / "no.pt"))), tmp_path)


def test_resnet_encoder_loads_into_every_backbone_weight(tmp_path):
    path = tmp_path / "encoder.pt"
    state = _save_encoder(path, "resnet18", {}, 32)
    torch.manual_seed(0)
    model = build_upernet("resnet18", 11, 48, channels=16, aux_channels=16)
    heads = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    report = load_init(model, path, "resnet18")
    assert report["loaded"] == len(state) and report["dropped"] == report["resized"] == []
    own = model.backbone.state_dict()
    assert set(own) == set(state)
    assert all(torch.equal(own[k], v) for k, v in state.items())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in heads.items())  # heads keep their init


def test_vit_encoder_pos_embed_is_resampled_and_final_norm_dropped(tmp_path):
    torch.manual_seed(0)
    enc = MaskedImageModel(VIT).encoder_state_dict()  # 32 px, 4 px patches: 8x8 grid
    path = tmp_path / "encoder.pt"
    meta = {"stage": "pretrain", "backbone": VIT.backbone, "img_size": 32, "preset": "a2mim_vit"}
    meta["backbone_kwargs"] = dict(VIT.backbone_kwargs)
    checkpoint.atomic_save({"state_dict": enc, "meta": meta}, path)
    model = build_upernet(VIT.backbone, 11, 48, dict(VIT.backbone_kwargs), channels=16)
    report = load_init(model, path, VIT.backbone, dict(VIT.backbone_kwargs))
    assert report["dropped"] == ["norm.bias", "norm.weight"]
    assert report["resized"] == ["pos_embed: (1, 65, 192) -> (1, 145, 192)"]
    own = model.backbone.state_dict()
    for key, value in enc.items():
        if key not in ("pos_embed", "norm.weight", "norm.bias"):
            assert torch.equal(own[key], value), key
    # cls token kept; the 8x8 grid resampled bicubically (align_corners=False) to 12x12
    assert torch.equal(own["pos_embed"][:, :1], enc["pos_embed"][:, :1])
    grid = enc["pos_embed"][:, 1:].reshape(1, 8, 8, 192).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False)
    assert torch.allclose(own["pos_embed"][:, 1:], ref.flatten(2).transpose(1, 2), atol=1e-6)
    # strides 1, 2, 4, 8 from the 4 px patches through the simple pyramid
    assert model.plain and model.strides == [1, 2, 4, 8]
    main, aux = model(torch.randn(2, 3, 48, 48))
    assert main.shape == (2, 11, 48, 48) and aux.shape == (2, 11, 12, 12)


def test_vit_layer_decay_groups_follow_mmseg():
    depth = VIT.backbone_kwargs["depth"]
    model = build_upernet(VIT.backbone, 11, 32, dict(VIT.backbone_kwargs), channels=16)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.65)

    def layer(name: str) -> int:  # mmseg LayerDecayOptimizerConstructor numbering
        if not name.startswith("backbone."):
            return depth + 1  # neck, heads
        sub = name[len("backbone.") :]
        if sub.startswith(("cls_token", "pos_embed", "patch_embed")):
            return 0
        return int(sub.split(".")[1]) + 1  # blocks.i

    names = {id(p): n for n, p in model.named_parameters()}
    seen = 0
    for group in groups:
        for p in group["params"]:
            name = names[id(p)]
            assert group["lr_scale"] == pytest.approx(0.65 ** (depth + 1 - layer(name))), name
            no_decay = p.ndim <= 1 or name in ("backbone.pos_embed", "backbone.cls_token")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
            seen += 1
    assert seen == len(names)
    flat = param_groups(model, weight_decay=0.05)
    assert {g["lr_scale"] for g in flat} == {1.0}
    cfg = segment.SegmentOptimConfig(layer_decay=0.65, warmup_iters=2, min_lr=0.0)
    opt = segment.build_optimizer(model, cfg, lr=1e-3)
    sched = segment.build_scheduler(opt, cfg, total_steps=10, lr=1e-3)
    sched.step_update(2)  # end of warm-up: lr * lr_scale; then linear (power 1) decay
    assert all(g["lr"] == pytest.approx(1e-3 * g["lr_scale"]) for g in opt.param_groups)
    sched.step_update(6)
    assert all(g["lr"] == pytest.approx(0.5e-3 * g["lr_scale"]) for g in opt.param_groups)


# ------------------------------------------------------------------------ pipeline, inference


def test_train_transform_is_seeded_and_keeps_labels_aligned():
    img = torch.rand(3, 40, 60)
    label = torch.arange(40 * 60).reshape(40, 60) % 7  # a label that encodes pixel positions
    label[:5] = 255
    tf = SegTrainTransform(img_scale=(120, 40), crop_size=32, cat_max_ratio=0.75)
    a = tf(img, label, np.random.default_rng(5))
    b = tf(img, label, np.random.default_rng(5))
    c = tf(img, label, np.random.default_rng(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (3, 32, 32) and a[1].shape == (32, 32) and a[1].dtype == torch.int64
    assert set(a[1].unique().tolist()) <= set(range(7)) | {255}
    # without resize, photometric distortion or flip: a crop of the input, same window
    fixed = {"img_scale": (60, 40), "ratio_range": (1.0, 1.0), "crop_size": 32}
    plain = SegTrainTransform(**fixed, cat_max_ratio=1.0, hflip=0.0, photometric=False)
    position = torch.arange(40 * 60).reshape(40, 60)  # each label value names its pixel
    x, y = plain(img, position, np.random.default_rng(0))
    r, c = divmod(int(y[0, 0]), 60)
    assert torch.equal(y, position[r : r + 32, c : c + 32])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(x * std + mean, img[:, r : r + 32, c : c + 32], atol=1e-5)
    flip = SegTrainTransform(**fixed, cat_max_ratio=1.0, hflip=1.0, photometric=False)
    x, y = flip(img, position, np.random.default_rng(0))  # same window, mirrored
    assert torch.equal(y, position[r : r + 32, c : c + 32].flip(-1))
    assert torch.allclose(x * std + mean, img[:, r : r + 32, c : c + 32].flip(-1), atol=1e-5)
    # the test size fits (long, short) keeping the ratio (mmcv rescale_size)
    assert rescale_size(683, 512, (2048, 512)) == (683, 512)
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(300, 1400, (2048, 512)) == (439, 2048)
    assert eval_input(img, (120, 20)).shape == (3, 20, 30)


class _Scale2(torch.nn.Module):
    """A stand-in segmenter whose logits are twice its input (3 "classes")."""

    def predict(self, img_bchw: torch.Tensor) -> torch.Tensor:
        return 2 * img_bchw


def test_slide_inference_covers_every_pixel_and_averages_overlaps():
    img = torch.randn(2, 3, 50, 70)
    for crop, stride in ((32, 21), (32, 32), (64, 10), (50, 1)):
        assert torch.allclose(slide_logits(_Scale2(), img, crop, stride), 2 * img, atol=1e-6)
    # a real network: one window over the whole image equals whole-image inference
    model = build_upernet("resnet18", 5, 32, channels=16, aux_channels=16).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(slide_logits(model, x, 32, 16), model.predict(x), atol=1e-5)


# ---------------------------------------------------------------------------------- full runs


def _naive_eval(model_pt, root, img_scale) -> float:
    """mIoU of ``model.pt`` from a plain loop over the val files: PIL images, whole-image
    logits resized to the label, per-class IoU from explicit sums, mean over classes seen."""
    saved = checkpoint.load(model_pt)
    meta = saved["meta"]
    model = build_upernet(
        meta["backbone"], meta["num_classes"], meta["crop_size"], channels=32, aux_channels=16
    )
    model.load_state_dict(saved["state_dict"])
    model.eval()
    inter = np.zeros(meta["num_classes"])
    union = np.zeros(meta["num_classes"])
    for path in sorted((root / "images" / "validation").iterdir()):
        rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        raw = np.asarray(Image.open(root / "annotations" / "validation" / f"{path.stem}.png"))
        label = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
        img = eval_input(torch.from_numpy(rgb).permute(2, 0, 1), img_scale)[None]
        with torch.no_grad():
            logits = model.predict(img)
        logits = torch.nn.functional.interpolate(logits, size=label.shape, mode="bilinear")
        pred = logits.argmax(1)[0].numpy()
        valid = label != 255
        for k in range(meta["num_classes"]):
            p, t = (pred == k) & valid, (label == k) & valid
            inter[k] += (p & t).sum()
            union[k] += (p | t).sum()
    seen = union > 0
    return 100.0 * float(np.mean(inter[seen] / union[seen]))


def test_run_evaluates_and_writes_everything(scenes, tmp_path):
    cfg = segment.load_config(_cfg(scenes, iters=4))
    metrics = segment.run(cfg, tmp_path)
    assert set(metrics) == {"miou", "aacc", "macc", "final_loss"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0.0 <= metrics["miou"] <= 100.0 and 0.0 <= metrics["aacc"] <= 100.0
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    derived = yaml.safe_load((tmp_path / "resolved_config.yaml").read_text())["derived"]
    assert derived["total_steps"] == 4 and derived["out_indices"] == [1, 2, 3, 4]
    assert derived["strides"] == [4, 8, 16, 32] and derived["lr"] == pytest.approx(1e-3)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    assert [x["step"] for x in lines if "miou" in x] == [4]
    per_class = json.loads((tmp_path / "per_class_iou.json").read_text())
    assert len(per_class) == ADE_NUM_CLASSES
    naive = _naive_eval(tmp_path / "model.pt", scenes, cfg.data.img_scale)
    assert naive == pytest.approx(metrics["miou"], abs=1e-6)


def test_resume_is_bit_identical(scenes, tmp_path):
    cfg = segment.load_config(
        _cfg(
            scenes,
            model={"drop_path_rate": 0.1},
            eval={"every_steps": 3},
            track=True,
            tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        )
    )
    full = segment.run(cfg, tmp_path / "full")
    assert segment.run(cfg, tmp_path / "cut", stop_after_steps=5) == {"stopped_at_step": 5.0}
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 4
    assert not (tmp_path / "cut" / "metrics.json").exists()
    torch.manual_seed(123)  # the restart must not depend on global RNG state
    random.seed(123)
    np.random.seed(123)
    resumed = segment.run(cfg, tmp_path / "cut")
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key

    def strip(path):  # timings differ between runs; everything else must not
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]

    rows = strip(tmp_path / "cut" / "metrics.jsonl")
    assert strip(tmp_path / "full" / "metrics.jsonl") == rows
    assert [r["step"] for r in rows if "miou" in r] == [3, 6]
    assert full == resumed

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    run_id = (tmp_path / "cut" / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "segment"
    assert run.data.tags["method"] == "scratch"
    for key in ("loss", "miou"):
        history = client.get_metric_history(run_id, key)
        expected = {r["step"]: r[key] for r in rows if key in r}
        assert {m.step: m.value for m in history} == pytest.approx(expected), key

    with pytest.raises(ConfigError, match="different config"):
        segment.run(segment.load_config({**to_dict(cfg), "seed": 1}), tmp_path / "cut")


def test_vit_run_with_init_layer_decay_and_slide_eval(scenes, tmp_path):
    path = tmp_path / "encoder.pt"
    kwargs = dict(VIT.backbone_kwargs)
    _save_encoder(path, VIT.backbone, kwargs, 32, preset="a2mim_vit_tiny")
    cfg = segment.load_config(
        _cfg(
            scenes,
            init=str(path),
            iters=2,
            model={
                "backbone": VIT.backbone,
                "backbone_kwargs": kwargs,
                "out_indices": [1, 3, 4, 5],
            },
            optim={"layer_decay": 0.65, "warmup_iters": 1},
            eval={"mode": "slide", "stride": 32},
        )
    )
    metrics = segment.run(cfg, tmp_path / "run")
    assert math.isfinite(metrics["miou"])
    derived = yaml.safe_load((tmp_path / "run" / "resolved_config.yaml").read_text())["derived"]
    depth = kwargs["depth"]
    assert derived["lr_scales"] == sorted(round(0.65**k, 6) for k in range(depth + 2))
    assert derived["simple_pyramid"] and derived["strides"] == [1, 2, 4, 8]
    assert derived["init"]["resized"] == ["pos_embed: (1, 65, 192) -> (1, 145, 192)"]
    assert derived["init"]["meta"]["preset"] == "a2mim_vit_tiny"


def _run_cli(cfg_file, out, env) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "a2mim.cli",
        "segment",
        "--config",
        str(cfg_file),
        "--out",
        str(out),
    ]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def test_cli_resume_after_sigkill_is_bit_identical(scenes, tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg(scenes, iters=12, ckpt_every_steps=2)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    full = _run_cli(cfg_file, tmp_path / "full", env)
    assert full.wait(timeout=300) == 0, full.stderr.read()

    killed = tmp_path / "killed"
    proc = _run_cli(cfg_file, killed, env)
    deadline = time.time() + 300
    while not (killed / "checkpoint.pt").exists():
        assert proc.poll() is None, "finished before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists()
    assert 0 < torch.load(killed / "checkpoint.pt", weights_only=True)["step"] < 12

    resumed = _run_cli(cfg_file, killed, env)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 12
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    full_metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert json.loads((killed / "metrics.json").read_text()) == full_metrics

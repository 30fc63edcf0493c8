"""The finetune stage on real Fashion-MNIST images: config errors, strict encoder loading (wrong
backbone, a real pretrain encoder.pt, a ViT encoder under average pooling), layer-wise lr decay,
a full run with every augmentation switched on, and exact resume; plus the shared pieces of
``a2mim.train.classify`` (top-k counting, seeded sampling and RNG scopes)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from a2mim import predictions
from a2mim.config import ConfigError
from a2mim.data.transforms import eval_transform
from a2mim.mim import MaskedImageModel, get_preset
from a2mim.stages import finetune, pretrain
from a2mim.train import checkpoint
from a2mim.train.classify import (
    AugmentedDataset,
    AugSampler,
    load_classifier,
    rng_scope,
    topk_correct,
)
from a2mim.train.encoder import create_classifier, load_encoder
from a2mim.train.optim import OptimConfig, build_scheduler
from a2mim.train.rundir import init_tags
from a2mim.train.sampling import EpochSampler, SeededDataset, mix_seed

VIT = get_preset("a2mim_vit_tiny")  # vit_tiny_patch16_224, patch 4, depth 6, 32 px


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def encoder_pt(fmnist, tmp_path_factory):
    """The encoder.pt of a real (one-epoch) A²MIM ResNet-18 pretrain run."""
    out = tmp_path_factory.mktemp("pre")
    cfg = {
        "scale": "tiny",
        "model": {"preset": "a2mim_resnet18"},
        "data": {"root": str(fmnist)},
        "optim": {"base_lr": 1e-3, "lr_batch_divisor": 16, "warmup_epochs": 0.5},
        "epochs": 1,
        "batch_size": 16,
        "ckpt_every_steps": 100,
        "figure_every_epochs": 100,
        "figure_images": 2,
        "progress": False,
        "track": False,
    }
    pretrain.run(pretrain.load_config(cfg), out)
    return out / "encoder.pt"


def _cfg(root, **top) -> dict:
    cfg = {
        "scale": "tiny",
        "model": {"backbone": "resnet18", "img_size": 32},
        "data": {"root": str(root), "scale": [0.35, 1.0], "test_crop_pct": 1.0},
        "optim": {"opt": "lamb", "base_lr": 5e-3, "lr_batch_divisor": 16, "warmup_epochs": 0.5},
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


def _vit_cfg(**optim) -> finetune.FinetuneConfig:
    return finetune.load_config(
        {
            "model": {
                "backbone": VIT.backbone,
                "backbone_kwargs": dict(VIT.backbone_kwargs),
                "img_size": 32,
                "global_pool": "avg",
            },
            "optim": {"opt": "adamw", "weight_decay": 0.05, **optim},
        }
    )


# ----------------------------------------------------------------------------- config errors


def test_unknown_key_lists_valid_keys(fmnist):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epoch'\].*did you mean 'epochs'"):
        finetune.load_config({**_cfg(fmnist), "epoch": 3})
    with pytest.raises(ConfigError, match=r"optim: unknown key.*'layer_decay'.*valid keys are"):
        finetune.load_config(_cfg(fmnist, optim={"layer_decy": 0.65}))
    with pytest.raises(ConfigError, match=r"'resnet5' is not a timm model.*resnet50"):
        finetune.load_config(_cfg(fmnist, model={"backbone": "resnet5"}))
    with pytest.raises(ConfigError, match="'lamb2' is not a timm optimizer"):
        finetune.load_config(_cfg(fmnist, optim={"opt": "lamb2"}))
    with pytest.raises(ConfigError, match="even batch_size"):
        finetune.load_config(_cfg(fmnist, mixup={"cutmix_alpha": 1.0}, batch_size=15))
    with pytest.raises(ConfigError, match=r"loss\.kind: 'focal' is not one of"):
        finetune.load_config(_cfg(fmnist, loss={"kind": "focal"}))


def test_missing_init_is_named(fmnist, tmp_path):
    cfg = finetune.load_config(_cfg(fmnist, init=str(tmp_path / "nope.pt")))
    with pytest.raises(FileNotFoundError, match=r"nope\.pt does not exist"):
        finetune.run(cfg, tmp_path / "run")


# ---------------------------------------------------------------------------- encoder loading


def test_wrong_checkpoint_names_missing_and_unexpected_keys(fmnist, tmp_path):
    other = timm.create_model("resnet34", num_classes=0)
    bad = tmp_path / "encoder.pt"
    meta = {"stage": "pretrain", "backbone": "resnet34", "backbone_kwargs": {}, "img_size": 32}
    checkpoint.atomic_save({"state_dict": other.state_dict(), "meta": meta}, bad)
    cfg = finetune.load_config(_cfg(fmnist, init=str(bad)))
    with pytest.raises(ValueError) as err:
        finetune.run(cfg, tmp_path / "run")
    msg = str(err.value)
    assert "unexpected keys: layer1.2." in msg  # resnet34 has 3 blocks in layer1, resnet18 2
    assert "'backbone': 'resnet34'" in msg and "'backbone': 'resnet18'" in msg
    assert not (tmp_path / "run" / "checkpoint.pt").exists()

    # same keys, other shapes: a one-channel stem
    narrow = timm.create_model("resnet18", num_classes=0, in_chans=1)
    checkpoint.atomic_save({"state_dict": narrow.state_dict(), "meta": meta}, bad)
    with pytest.raises(ValueError, match=r"shape keys: .*conv1\.weight: checkpoint"):
        load_encoder(create_classifier("resnet18", 10, 32), bad, "resnet18", 32)

    # a classifier checkpoint is not an encoder
    clf = {"state_dict": create_classifier("resnet18", 10, 32).state_dict(), "meta": {}}
    checkpoint.atomic_save(clf, bad)
    with pytest.raises(ValueError, match=r"classifier keys \['fc.bias', 'fc.weight'\]"):
        load_encoder(create_classifier("resnet18", 10, 32), bad, "resnet18", 32)
    checkpoint.atomic_save({**clf, "meta": {"stage": "linprobe"}}, bad)
    with pytest.raises(ValueError, match=r"output of stage 'linprobe'.*model\.pt of a finetune"):
        load_encoder(create_classifier("resnet18", 10, 32), bad, "resnet18", 32)


@pytest.mark.parametrize(
    ("backbone", "kwargs", "pool", "removed", "renamed"),
    [
        ("resnet18", {}, None, ["fc.bias", "fc.weight"], []),
        (
            "vit_tiny_patch16_224",
            {"depth": 2},
            "avg",
            ["head.bias", "head.weight"],
            ["fc_norm.weight -> norm.weight", "fc_norm.bias -> norm.bias"],
        ),
    ],
)
def test_finetuned_classifier_loads_as_a_supervised_encoder(
    tmp_path, backbone, kwargs, pool, removed, renamed
):
    # The "(Sup.)" rows of Tables 3-4 transfer a fine-tuned classifier's encoder (model.pt).
    torch.manual_seed(0)
    clf = create_classifier(backbone, 10, 32, kwargs, global_pool=pool)
    meta = {"stage": "finetune", "backbone": backbone, "backbone_kwargs": kwargs, "img_size": 32}
    path = tmp_path / "model.pt"
    checkpoint.atomic_save({"state_dict": clf.state_dict(), "meta": meta}, path)
    encoder = create_classifier(backbone, 0, 32, kwargs)
    report = load_encoder(encoder, path, backbone, 32, kwargs, allow_new_head=False)
    assert report["supervised"] == {"removed": removed, "renamed": renamed}
    trained = clf.state_dict()
    for key, value in encoder.state_dict().items():
        source = "fc_" + key if renamed and key.startswith("norm.") else key
        assert torch.equal(value, trained[source]), key
    assert report["loaded"] == len(encoder.state_dict())
    assert init_tags(backbone, report)["method"] == "supervised"


def test_pretrain_encoder_loads_into_every_weight_but_the_head(fmnist, encoder_pt):
    enc = torch.load(encoder_pt, weights_only=True)["state_dict"]
    torch.manual_seed(0)
    scratch, none = finetune.build_model(finetune.load_config(_cfg(fmnist)), 10)
    torch.manual_seed(0)
    model, report = finetune.build_model(
        finetune.load_config(_cfg(fmnist, init=str(encoder_pt))), 10
    )
    assert none is None
    assert report["head_init"] == ["fc.bias", "fc.weight"] and report["dropped"] == []
    assert report["loaded"] == len(enc) and report["meta"]["backbone"] == "resnet18"
    own, ref = model.state_dict(), scratch.state_dict()
    for key, value in enc.items():
        assert torch.equal(own[key], value), key
    changed = [k for k in enc if enc[k].is_floating_point() and not torch.equal(enc[k], ref[k])]
    assert "conv1.weight" in changed and "layer4.1.conv2.weight" in changed
    for key in ("fc.weight", "fc.bias"):  # the head keeps its (seeded) fresh init
        assert torch.equal(own[key], ref[key])


def test_vit_average_pooling_drops_the_final_norm_and_inits_fc_norm(tmp_path):
    torch.manual_seed(0)
    enc = MaskedImageModel(VIT).encoder_state_dict()
    path = tmp_path / "encoder.pt"
    meta = {"backbone": VIT.backbone, "backbone_kwargs": dict(VIT.backbone_kwargs), "img_size": 32}
    checkpoint.atomic_save({"state_dict": enc, "meta": meta}, path)
    cfg = _vit_cfg()
    cfg = finetune.load_config({**_to_dict(cfg), "init": str(path)})
    model, report = finetune.build_model(cfg, 10)
    assert report["dropped"] == ["norm.bias", "norm.weight"]
    assert report["head_init"] == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in enc.items() if not k.startswith("norm."))


def _to_dict(cfg):
    from a2mim.config import to_dict

    return to_dict(cfg)


# --------------------------------------------------------------------------- optimizer groups


def test_vit_layer_decay_scales_decrease_from_head_to_stem():
    cfg = _vit_cfg(layer_decay=0.65)
    depth = VIT.backbone_kwargs["depth"]
    model = create_classifier(VIT.backbone, 10, 32, dict(VIT.backbone_kwargs), global_pool="avg")
    opt = finetune.build_optimizer(model, cfg.optim, lr=1e-3)

    def layer(name: str) -> int:  # independent statement of the BEiT/timm layer numbering
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return depth + 1  # final norm, fc_norm, head

    names = {id(p): n for n, p in model.named_parameters()}
    seen = 0
    for group in opt.param_groups:
        for p in group["params"]:
            expected = 0.65 ** (depth + 1 - layer(names[id(p)]))
            assert group["lr_scale"] == pytest.approx(expected), names[id(p)]
            no_decay = p.ndim <= 1 or names[id(p)] in ("pos_embed", "cls_token")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), names[id(p)]
            seen += 1
    assert seen == len(names)
    scales = sorted({round(g["lr_scale"], 9) for g in opt.param_groups}, reverse=True)
    assert len(scales) == depth + 2 and scales[0] == 1.0
    # the scheduler applies each group's scale once: lr(group) = lr * lr_scale after warm-up
    sched = build_scheduler(opt, OptimConfig(warmup_epochs=1, min_lr=0.0), 100, 10)
    sched.step_update(10)
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])

    flat = finetune.build_optimizer(model, _vit_cfg().optim, lr=1e-3)
    assert all(g.get("lr_scale", 1.0) == 1.0 for g in flat.param_groups)


# ---------------------------------------------------------------------------------- full runs


def _naive_top1(model, root) -> float:
    """Accuracy from a plain loop over the val images (no DataLoader, no ``evaluate``)."""
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


def test_run_with_every_augmentation_writes_everything(fmnist, encoder_pt, tmp_path):
    cfg = finetune.load_config(
        _cfg(
            fmnist,
            init=str(encoder_pt),
            model={"drop_path_rate": 0.1},
            data={"auto_augment": "rand-m6-mstd0.5-inc1", "reprob": 0.25, "repeated_aug": 2},
            mixup={"mixup_alpha": 0.1, "cutmix_alpha": 1.0},
            loss={"kind": "bce"},
            ema_decay=0.9,
            optim={"grad_clip": 1.0},
        )
    )
    metrics = finetune.run(cfg, tmp_path)
    resolved = yaml.safe_load((tmp_path / "resolved_config.yaml").read_text())
    derived = resolved["derived"]
    assert resolved["stage"] == "finetune"
    assert derived["steps_per_epoch"] == 80 // 16 and derived["total_steps"] == 10
    assert derived["lr"] == pytest.approx(5e-3 * 16 / 16)
    assert derived["num_classes"] == 10 and len(derived["classes"]) == 10
    assert derived["init"]["head_init"] == ["fc.bias", "fc.weight"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "loss" in x]
    evals = [x for x in lines if "top1" in x]
    assert [x["step"] for x in train] == list(range(1, 11))
    assert [(x["step"], x["epoch"]) for x in evals] == [(5, 1), (10, 2)]
    for key in ("top1", "top5", "top1_ema", "top5_ema"):
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["top5"] >= metrics["top1"] and metrics["top5_ema"] >= metrics["top1_ema"]
    last_eval = {k: v for k, v in evals[-1].items() if k not in ("step", "epoch")}
    best = max(evals, key=lambda x: x["top1"])  # the first of equals: both epochs are the last 10
    assert metrics == {
        **last_eval,
        "final_loss": train[-1]["loss"],
        "top1_final": last_eval["top1"],
        "top1_best_last10": best["top1"],
        "top1_best_last10_epoch": float(best["epoch"]),
    }
    assert set(last_eval) == {"top1", "top5", "val_loss", "top1_ema", "top5_ema", "val_loss_ema"}
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    # per-sample predictions of both rules, for the paired statistics of the audit
    final = predictions.read(tmp_path / "predictions" / "final.npz")
    assert len(final.ids) == 40 and final.meta["epoch"] == 2
    assert all(i.count("/") == 1 and not i.startswith("/") for i in final.ids)  # class/file
    assert final.score() == pytest.approx(metrics["top1"])
    best_preds = predictions.read(tmp_path / "predictions" / "best_last10.npz")
    assert best_preds.score() == pytest.approx(metrics["top1_best_last10"])

    model, meta = load_classifier(tmp_path / "model.pt")
    assert meta["classes"] == derived["classes"] and meta["init"] == str(encoder_pt)
    assert _naive_top1(model, fmnist) == pytest.approx(metrics["top1"])
    ema_model, _ = load_classifier(tmp_path / "model.pt", ema=True)
    assert _naive_top1(ema_model, fmnist) == pytest.approx(metrics["top1_ema"])


def test_resume_is_bit_identical(fmnist, tmp_path):
    cfg = finetune.load_config(
        _cfg(
            fmnist,
            epochs=3,
            model={"drop_path_rate": 0.1},
            data={"auto_augment": "rand-m6-mstd0.5-inc1", "reprob": 0.25, "repeated_aug": 2},
            mixup={"mixup_alpha": 0.2, "cutmix_alpha": 1.0},
            loss={"kind": "ce", "smoothing": 0.1},
            ema_decay=0.9,
            track=True,
            tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        )
    )
    full = finetune.run(cfg, tmp_path / "full")
    assert finetune.run(cfg, tmp_path / "cut", stop_after_steps=8) == {"stopped_at_step": 8.0}
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 6
    assert not (tmp_path / "cut" / "model.pt").exists()
    # the restart must not depend on global RNG state left behind by anything else
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    resumed = finetune.run(cfg, tmp_path / "cut")
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 15
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)

    def strip(path):  # timings differ between runs; everything else must not
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "img_per_s"} for r in rows]

    assert strip(tmp_path / "full" / "metrics.jsonl") == strip(tmp_path / "cut" / "metrics.jsonl")
    assert full == resumed

    # MLflow: the restart continued the same run; every step's metrics are there once
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    run_id = (tmp_path / "cut" / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "finetune"
    assert run.data.tags["method"] == "scratch" and run.data.params["optim.opt"] == "lamb"
    rows = strip(tmp_path / "cut" / "metrics.jsonl")
    for key in ("loss", "top1", "top1_ema"):
        history = client.get_metric_history(run_id, key)
        expected = {r["step"]: r[key] for r in rows if key in r}
        assert sorted(m.step for m in history) == sorted(expected), key
        assert {m.step: m.value for m in history} == pytest.approx(expected)


def test_resume_refuses_a_different_config(fmnist, tmp_path):
    finetune.run(finetune.load_config(_cfg(fmnist, epochs=1)), tmp_path)
    with pytest.raises(ConfigError, match="different config"):
        finetune.run(finetune.load_config(_cfg(fmnist, epochs=1, seed=1)), tmp_path)
    # the refused run leaves the existing run's resolved config alone
    assert yaml.safe_load((tmp_path / "resolved_config.yaml").read_text())["seed"] == 0


# ------------------------------------------------------------------- shared classify pieces


def test_topk_correct_golden():
    logits = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.3, 0.2, 0.8],  # order 1 5 3 4 0 2
            [0.5, 0.1, 0.2, 0.3, 0.4, 0.0],  # order 0 4 3 2 1 5
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # order 5 4 3 2 1 0
        ]
    )
    target = torch.tensor([5, 1, 0])
    assert topk_correct(logits, target, (1, 2, 5)) == [0, 1, 2]
    assert topk_correct(logits, torch.tensor([1, 0, 5]), (1, 5)) == [3, 3]
    # fewer classes than k: top-5 of 3 classes counts every sample
    assert topk_correct(logits[:, :3], torch.tensor([2, 2, 2]), (1, 5)) == [1, 3]


def test_aug_sampler_order_repeats_and_shards():
    plain = list(AugSampler(20, seed=3, epoch=2, usable=16))
    ref = list(EpochSampler(20, seed=3, epoch=2, usable=16))
    assert [(e, i) for e, _, i in plain] == ref  # same permutation as the pretrain sampler
    rep = AugSampler(20, seed=3, epoch=2, repeats=3, usable=18).keys()
    assert [c for _, c, _ in rep] == [0, 1, 2] * 6
    assert [i for _, _, i in rep][::3] == [i for _, i in ref[:6]]
    ranks = [
        AugSampler(20, 3, 2, repeats=3, rank=r, world_size=2, usable=18).keys() for r in (0, 1)
    ]
    assert sorted(ranks[0] + ranks[1]) == sorted(rep)
    assert list(AugSampler(20, 3, 2, repeats=3, start=4, usable=18)) == rep[4:]


def test_rng_scope_is_reproducible_and_leaves_global_state_alone():
    def draws():
        return torch.rand(2).tolist(), np.random.rand(2).tolist(), [random.random()]

    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    expected_after = draws()
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    with rng_scope(42):
        first = draws()
    with rng_scope(42):
        assert draws() == first
    with rng_scope(43):
        assert draws() != first
    assert draws() == expected_after


def test_per_sample_seeding_seeds_only_the_cpu_generator(monkeypatch):
    """``torch.manual_seed`` would also seed every CUDA device: under the training step on a GPU
    (the generator of its dropout and drop path), or, before CUDA starts, lazily with a stack
    trace recorded per call (0.1-0.5 ms a sample). The per-sample scopes seed the CPU alone,
    with the same CPU stream."""
    cuda_seeds: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", cuda_seeds.append)
    data = [(torch.zeros(1), 0)] * 4
    sets = [
        AugmentedDataset(data, lambda x: x + torch.rand(1), seed=3),
        SeededDataset(data, lambda x: x + torch.rand(1), seed=3),
    ]
    with rng_scope(7):
        scoped = torch.rand(3)
    drawn = [sets[0][(0, 0, 1)][0], sets[1][(0, 1)][0]]
    assert cuda_seeds == []
    torch.manual_seed(7)
    assert torch.equal(scoped, torch.rand(3))
    torch.manual_seed(mix_seed(3, 0, 0, 1))
    assert torch.equal(drawn[0], torch.rand(1))
    torch.manual_seed(mix_seed(3, 0, 1))
    assert torch.equal(drawn[1], torch.rand(1))


def test_randaugment_posterize_at_full_magnitude_works_on_any_pillow(fmnist):
    """``rand-m9-mstd0.5-inc1`` (the ViT recipe) reaches magnitude 10, where timm asks Pillow to
    keep 0 bits; the stage's transform returns the all-black image older Pillow gave."""
    cfg = finetune.load_config(_cfg(fmnist, data={"auto_augment": "rand-m10-mstd0-inc1"}))
    tf = finetune.train_transform(cfg)
    ops = [op for step in tf.transforms for op in getattr(step, "ops", [])]
    poster = next(op for op in ops if op.name == "PosterizeIncreasing")
    poster.prob = 1.0
    img = Image.open(next((fmnist / "train" / "bag").iterdir())).convert("RGB")
    assert np.asarray(img).max() > 0
    assert np.asarray(poster(img)).max() == 0
    with rng_scope(0):  # the whole pipeline, many draws at magnitude 10
        for _ in range(60):
            assert tf(img).shape == (3, 32, 32)

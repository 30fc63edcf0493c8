"""Reference-ViT (timm BEiT) encoders into the detection body and UperNet: strict loading, the
resampled position embedding and relative position tables, and the init / recipe family check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from timm.layers import resize_rel_pos_bias_table

from a2mim import command, recipes
from a2mim.config import load_yaml
from a2mim.detection.backbone import build_body
from a2mim.detection.spec import DetectorSpec
from a2mim.detection.vit_body import BeitBody
from a2mim.models.beit_transfer import (
    check_init_family,
    init_encoder,
    resample_pos_embed,
    resize_rel_pos_table,
)
from a2mim.models.upernet import build_upernet, load_init, slide_logits
from a2mim.preflight import PreflightError, check_chain
from a2mim.train.encoder import create_classifier

BEIT = "beit_base_patch16_224"
TINY = {
    "use_abs_pos_emb": True,
    "use_rel_pos_bias": True,
    "init_values": 0.1,
    "qkv_bias": True,
    "global_pool": "token",
    "embed_dim": 32,
    "depth": 4,
    "num_heads": 2,
    "mlp_ratio": 2.0,
}

# a ViTDet-style detector on the tiny BEiT: windowed blocks 0 and 2, global blocks 1 and 3
SFP = DetectorSpec(
    backbone=BEIT,
    backbone_kwargs=TINY,
    img_size=224,
    arch="sfp",
    window_size=14,
    global_blocks=(1, 3),
    rel_pos_bias=True,
)


def _save(path: Path, backbone: str, kwargs: dict, img_size: int = 224) -> Path:
    torch.manual_seed(0)
    encoder = create_classifier(backbone, 0, img_size, kwargs)
    with torch.no_grad():  # non-zero tables, so that a resize is visible
        for block in getattr(encoder, "blocks", []):
            table = getattr(block.attn, "relative_position_bias_table", None)
            if table is not None:
                table.normal_()
    meta = {"stage": "pretrain", "backbone": backbone, "backbone_kwargs": kwargs}
    meta |= {"img_size": img_size, "preset": "a2mim_vit_base"}
    torch.save({"state_dict": encoder.state_dict(), "meta": meta}, path)
    return path


@pytest.fixture(scope="module")
def beit_pt(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("beit") / "encoder.pt", BEIT, TINY)


def test_table_resize_is_timms_and_keeps_the_cls_entries():
    torch.manual_seed(1)
    table = torch.randn((2 * 14 - 1) ** 2 + 3, 12)
    resized = resize_rel_pos_table(table, (14, 14), (32, 32))
    want = resize_rel_pos_bias_table(
        table, new_window_size=(32, 32), new_bias_shape=((2 * 32 - 1) ** 2 + 3, 12)
    )
    assert resized.shape == ((2 * 32 - 1) ** 2 + 3, 12)
    torch.testing.assert_close(resized, want, rtol=0, atol=0)
    torch.testing.assert_close(resized[-3:], table[-3:], rtol=0, atol=0)
    centre = (2 * 32 - 1) * 31 + 31  # offset (0, 0) keeps its value
    torch.testing.assert_close(resized[centre], table[(2 * 14 - 1) * 13 + 13])
    assert resize_rel_pos_table(table, (14, 14), (14, 14)) is table


def test_pos_embed_resample_is_identity_at_the_same_grid():
    pos = torch.randn(1, 1 + 14 * 14, 8)
    torch.testing.assert_close(resample_pos_embed(pos, (14, 14), (14, 14)), pos, rtol=0, atol=0)
    assert resample_pos_embed(pos, (14, 14), (20, 30)).shape == (1, 1 + 600, 8)


def test_beit_encoder_into_the_detection_body(beit_pt):
    spec = SFP
    body, report = build_body(spec, str(beit_pt), max_side=320)
    assert isinstance(body, BeitBody)
    saved = torch.load(beit_pt, weights_only=True)["state_dict"]
    assert report["loaded"] == len(saved)  # strict: every key of encoder.pt, as written
    assert report["rel_pos_tables"]["blocks.0"] == "14x14 -> 14x14"
    assert report["rel_pos_tables"]["blocks.1"] == "14x14 -> 20x20"  # 320 px / 16
    # windowed blocks at the pre-training grid: the pretrained table without its cls entries
    key = "blocks.0.attn.relative_position_bias_table"
    torch.testing.assert_close(
        body.rel_pos[0].relative_position_bias_table.detach(), saved[key][:-3], rtol=0, atol=0
    )
    want = resize_rel_pos_table(saved[key.replace(".0.", ".1.")], (14, 14), (20, 20))[:-3]
    torch.testing.assert_close(body.rel_pos[1].relative_position_bias_table.detach(), want)
    assert not any("attn.relative_position" in k for k in body.state_dict())
    out = body(torch.randn(2, 3, 224, 288))["last"]  # a 14x18 grid: windows padded
    assert out.shape == (2, 32, 14, 18) and torch.isfinite(out).all()
    out.float().square().mean().backward()
    unused = [n for n, p in body.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused  # DistributedDataParallel needs every parameter in the graph
    # a detector rebuilt without init (load_detector) has the same keys and shapes
    fresh, _ = build_body(spec, None, max_side=320)
    fresh.load_state_dict(body.state_dict(), strict=True)


def test_beit_encoder_into_the_detectron2_backend(beit_pt):
    """The detectron2 backend builds the same BEiT body, loads the encoder strictly and trains."""
    pytest.importorskip("detectron2")
    from a2mim.detection.detectron2_backend import Detectron2MaskRCNN
    from a2mim.detection.spec import Input

    spec = SFP
    inputs = Input(min_size_train=(224,), max_size_train=320, min_size_test=224, max_size_test=320)
    torch.manual_seed(0)
    model = Detectron2MaskRCNN(spec, inputs, 3, str(beit_pt))
    assert isinstance(model.net.backbone.a2mim_body, BeitBody)
    saved = torch.load(beit_pt, weights_only=True)["state_dict"]
    assert model.init_report["loaded"] == len(saved)
    masks = torch.zeros(1, 224, 288, dtype=torch.uint8)
    masks[0, 40:160, 60:200] = 1
    target = {
        "boxes": torch.tensor([[60.0, 40.0, 200.0, 160.0]]),
        "labels": torch.tensor([2]),
        "masks": masks,
    }
    losses = model.train()([torch.rand(3, 224, 288)], [target])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    preds = model.eval()([torch.rand(3, 224, 288)])
    assert preds[0]["boxes"].dtype == torch.float32


def test_detection_body_without_relative_bias_drops_the_tables(beit_pt):
    spec = DetectorSpec(
        backbone=BEIT, backbone_kwargs=TINY, arch="sfp", window_size=14, rel_pos_bias=False
    )
    body, report = build_body(spec, str(beit_pt), max_side=224)
    assert body.rel_pos is None and set(report["rel_pos_tables"].values()) == {
        "removed (model.rel_pos_bias: false)"
    }
    assert torch.isfinite(body(torch.randn(1, 3, 224, 224))["last"]).all()


def test_beit_encoder_into_upernet(beit_pt):
    torch.manual_seed(0)
    model = build_upernet(BEIT, 5, 128, TINY, out_indices=[0, 1, 2, 3], channels=16, aux_channels=8)
    report = load_init(model, beit_pt, BEIT, TINY, 128)
    assert report["dropped"] == ["norm.bias", "norm.weight"]  # pruned final norm
    assert "pos_embed: (1, 197, 32) -> (1, 65, 32)" in report["resized"]
    key = "blocks.2.attn.relative_position_bias_table"
    assert f"{key}: (732, 2) -> (228, 2)" in report["resized"]
    saved = torch.load(beit_pt, weights_only=True)["state_dict"]
    want = resize_rel_pos_bias_table(saved[key], new_window_size=(8, 8), new_bias_shape=(228, 2))
    torch.testing.assert_close(model.backbone.state_dict()[key], want)
    model.eval()
    with torch.no_grad():
        logits = slide_logits(model, torch.randn(1, 3, 150, 200), crop=128, stride=85)
        small = model.predict(torch.randn(2, 3, 96, 128))  # padded to the crop, cut back
    assert logits.shape == (1, 5, 150, 200) and torch.isfinite(logits).all()
    assert small.shape == (2, 5, 96, 128) and torch.isfinite(small).all()
    with pytest.raises(ValueError, match=r"eval\.mode slide"):
        model.predict(torch.randn(1, 3, 160, 128))


def test_init_family_mismatch_is_a_preflight_error(beit_pt, tmp_path):
    plain = _save(
        tmp_path / "plain.pt", "vit_base_patch16_224", {"depth": 2, "embed_dim": 32, "num_heads": 2}
    )
    assert init_encoder(beit_pt)["backbone"] == BEIT
    assert check_init_family(init_encoder(beit_pt), BEIT, TINY, "x") is None
    message = check_init_family(init_encoder(plain), BEIT, TINY, "x")
    assert "plain ViT" in message and "vitb_plain_fpn_1x" in message
    for config, init, kind in (
        ("vitb_plain_fpn_1x", beit_pt, "reference ViT"),
        ("vitb_fpn_1x", plain, "plain ViT"),
    ):
        argv = ["detect", "--config", config, "--out", str(tmp_path / "run")]
        argv += ["--init", str(init), "--set", "backend=torchvision"]
        with pytest.raises(PreflightError, match=f"the init encoder is a {kind}"):
            command.check(argv, require_data=False)


def test_workflow_chain_check_before_any_run(tmp_path):
    out = ["--out", str(tmp_path / "x")]
    pretrain = ["pretrain", "--config", "vit_base_800ep", *out]
    check_chain(["segment", "--config", "upernet_vitb_160k", *out], pretrain, "init a2mim_vitb")
    with pytest.raises(PreflightError, match="reference ViT"):
        check_chain(
            ["segment", "--config", "upernet_vitb_plain_160k", *out], pretrain, "init a2mim_vitb"
        )


def test_whole_image_testing_of_a_beit_upernet_is_refused(tmp_path):
    argv = ["segment", "--config", "upernet_vitb_160k", "--out", str(tmp_path / "r")]
    with pytest.raises(PreflightError, match=r"eval\.mode: slide"):
        command.check([*argv, "--set", "eval.mode=whole"], require_data=False)
    cfg = load_yaml(recipes.resolve("segment", "upernet_vitb_160k"))
    assert cfg["model"]["backbone"] == BEIT and cfg["eval"]["mode"] == "slide"


def test_workflow_checks_each_run_against_its_init_run(tmp_path):
    import copy

    import yaml

    from a2mim.workflow import ConfigMatrixError, Matrix

    paper = yaml.safe_load((Path(__file__).parents[2] / "workflow/config/paper.yaml").read_text())
    config = {k: v for k, v in paper.items() if k not in STAGE_KEYS}
    config |= {"results": str(tmp_path / "results"), "analysis": {}}
    config["pretrain"] = {"a2mim_vitb_800ep": paper["pretrain"]["a2mim_vitb_800ep"]}
    config["segment"] = {"a2mim_vitb": paper["segment"]["a2mim_vitb"]}
    Matrix(config).check_chains(cache=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 1  # remembered
    wrong = copy.deepcopy(config)
    wrong["segment"]["a2mim_vitb"]["recipe"] = "upernet_vitb_plain_160k"
    with pytest.raises(ConfigMatrixError, match=r"segment\.a2mim_vitb: init a2mim_vitb_800ep"):
        Matrix(wrong).check_chains(cache=None)


STAGE_KEYS = ("pretrain", "finetune", "linprobe", "knn", "detect", "segment", "analysis")

from __future__ import annotations

import dataclasses

import pytest
import torch

from a2mim.mim import PRESETS, MaskedImageModel, MIMConfig, get_preset
from a2mim.mim.mask_token import MaskToken

SMALL = dict(backbone="resnet18", img_size=64, mask_patch_size=16, token_point="stage3")


def test_token_formulas_golden():
    x = torch.randn(2, 4, 3, 3)
    mask = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    mask[:, :, 1] = True
    view = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
    m = mask.to(x.dtype)
    add = MaskToken(4, "add", gamma_init=1e-6)
    t, g = view(add.token), view(add.gamma)
    assert torch.equal(add(x, mask, view), x * (1 - m) + x * m * g + t * m)
    plain = MaskToken(4, "add", gamma_init=None)
    assert torch.allclose(plain(x, mask, view), x + view(plain.token) * m)
    rep = MaskToken(4, "replace")
    assert torch.equal(rep(x, mask, view), x * (1 - m) + view(rep.token) * m)
    assert torch.count_nonzero(MaskToken(4, init="zeros").token) == 0
    assert 0 < MaskToken(4096).token.std().item() < 0.03


def test_simmim_replaces_at_the_first_point_and_has_no_freq_loss():
    cfg = get_preset("simmim_resnet18")
    model = MaskedImageModel(cfg)
    assert model.token_point == "stem" and model.token.mode == "replace"
    out = model(torch.randn(2, 3, 32, 32))
    assert out.loss_freq.item() == 0.0 and out.loss.item() == out.loss_spatial.item()


def test_a2mim_loss_is_spatial_plus_lambda_freq():
    model = MaskedImageModel(MIMConfig(**SMALL, freq_weight=0.5))
    out = model(torch.randn(2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    assert out.loss.item() == pytest.approx(out.loss_spatial.item() + 0.5 * out.loss_freq.item())
    assert out.pred_bchw.shape == (2, 3, 64, 64) and out.mask_bhw.shape == (2, 64, 64)
    assert out.mask_bhw.float().mean().item() == pytest.approx(10 / 16)


@pytest.mark.parametrize(
    "change",
    [
        dict(fill="zero"),
        dict(fill="none"),
        dict(token_mode="replace", token_point="first", token_gamma=None),
        dict(token_mode="none"),
        dict(token_point="stage2"),
        dict(freq_omega=False),
        dict(freq_weight=0.1),
        dict(freq_unmasked="detached"),
        dict(spatial_loss="focal_l1"),
        dict(token_init="zeros"),
    ],
)
def test_every_ablation_is_a_config_value(change):
    model = MaskedImageModel(MIMConfig(**{**SMALL, **change}))
    out = model(torch.randn(2, 3, 64, 64))
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_fill_reaches_the_encoder_input():
    img = torch.randn(2, 3, 64, 64)
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    outs = {}
    for fill in ("mean", "zero", "none"):
        model = MaskedImageModel(MIMConfig(**SMALL, fill=fill, token_mode="none")).eval()
        with torch.no_grad():
            outs[fill] = model.encode(img, mask)
    assert not torch.allclose(outs["mean"], outs["zero"])
    assert not torch.allclose(outs["zero"], outs["none"])


def test_param_groups_exclude_norms_biases_and_token_from_decay():
    model = MaskedImageModel(get_preset("a2mim_resnet18"))
    groups = {g["name"]: g for g in model.param_groups(0.05)}
    assert groups["token"]["lr_scale"] == 0.1 and groups["token"]["weight_decay"] == 0.0
    assert {id(p) for p in groups["token"]["params"]} == {
        id(model.token.token),
        id(model.token.gamma),
    }
    assert all(p.ndim > 1 for p in groups["decay"]["params"])
    assert all(p.ndim <= 1 for p in groups["no_decay"]["params"])
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))


def test_vit_pos_and_cls_get_no_decay():
    model = MaskedImageModel(get_preset("a2mim_vit_tiny"))
    no_decay = {
        id(p) for g in model.param_groups(0.05) if g["weight_decay"] == 0 for p in g["params"]
    }
    assert id(model.encoder.pos_embed) in no_decay and id(model.encoder.cls_token) in no_decay


def test_encoder_state_dict_is_plain_timm():
    import timm

    model = MaskedImageModel(get_preset("a2mim_resnet18"))
    sd = model.encoder_state_dict()
    plain = timm.create_model("resnet18", num_classes=0)
    assert set(sd) == set(plain.state_dict())
    plain.load_state_dict(sd, strict=True)


@pytest.mark.parametrize(
    "change,needle",
    [
        (dict(token_point="layer9"), "unknown token point 'layer9'"),
        (dict(mask_patch_size=8), "not a multiple of the stride 16"),
        (dict(img_size=48, mask_patch_size=16), "not divisible by the encoder stride 32"),
        (dict(token_mode="replace"), "gamma only applies"),
    ],
)
def test_invalid_configs_say_what_to_change(change, needle):
    with pytest.raises(ValueError, match=needle):
        MaskedImageModel(MIMConfig(**{**SMALL, **change}))


def test_wrong_input_size_is_rejected():
    model = MaskedImageModel(MIMConfig(**SMALL))
    with pytest.raises(ValueError, match="img_size=64"):
        model(torch.randn(1, 3, 32, 32))


def test_presets_follow_their_stated_sources():
    assert set(PRESETS) >= {
        "a2mim_resnet50",
        "a2mim_vit_small",
        "a2mim_vit_base",
        "simmim_resnet50",
        "simmim_vit_small",
        "simmim_vit_base",
    }
    r50 = get_preset("a2mim_resnet50")
    assert (r50.token_point, r50.token_gamma, r50.spatial_loss, r50.freq_weight) == (
        "stage3",
        1e-6,
        "focal_l1",
        0.5,
    )
    vit = get_preset("a2mim_vit_small")
    assert vit.backbone_kwargs["embed_dim"] == 768 and vit.backbone_kwargs["depth"] == 8
    assert (vit.token_point, vit.freq_weight, vit.freq_eps) == ("layer0", 0.1, 0.0)
    assert get_preset("a2mim_vit_base").freq_batch == 128
    for name, (_, note) in PRESETS.items():
        assert note, name
    with pytest.raises(KeyError, match="available"):
        get_preset("a2mim_resnet51")
    assert dataclasses.replace(r50, token_point="layer5").token_point == "layer5"


def test_gamma_group_decay_puts_gamma_in_the_decayed_group():
    cfg = dataclasses.replace(get_preset("a2mim_resnet18"), gamma_group="decay")
    model = MaskedImageModel(cfg)
    groups = {g["name"]: g for g in model.param_groups(0.05)}
    assert {id(p) for p in groups["token"]["params"]} == {id(model.token.token)}
    assert id(model.token.gamma) in {id(p) for p in groups["decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["decay"]["lr_scale"] == 1.0


def test_decoder_init_is_trunc_normal_002_bias_zero():
    torch.manual_seed(0)
    proj = MaskedImageModel(get_preset("a2mim_resnet18")).decoder.proj
    assert torch.equal(proj.bias, torch.zeros_like(proj.bias))
    w = proj.weight.detach()
    assert w.abs().max() <= 2.0  # trunc_normal_ bounds (-2, 2)
    assert 0.018 < float(w.std()) < 0.022  # 512 x 48 draws of std 0.02 (PyTorch default: 0.025)


def test_reference_vit_preset_is_the_reference_architecture():
    from timm.models.beit import Beit

    for name, depth, dim in (("a2mim_vit_small", 8, 768), ("a2mim_vit_base", 12, 768)):
        enc = MaskedImageModel(get_preset(name)).encoder
        assert isinstance(enc, Beit) and len(enc.blocks) == depth and enc.embed_dim == dim
        assert enc.pos_embed is not None and enc.pos_embed.shape == (1, 197, dim)  # absolute
        assert enc.rel_pos_bias is None  # per block, not shared
        blk = enc.blocks[-1]
        assert blk.attn.relative_position_bias_table.shape[0] == 27 * 27 + 3  # 14x14 window
        assert torch.equal(blk.gamma_1, torch.full_like(blk.gamma_1, 0.1))  # LayerScale 0.1
        assert blk.attn.q_bias is not None and blk.attn.v_bias is not None  # qkv bias
        assert blk.drop_path1.drop_prob == pytest.approx(0.1)  # drop path 0.1 (last block)
        assert isinstance(enc.norm, torch.nn.LayerNorm) and enc.norm.eps == 1e-6  # final norm
    assert get_preset("a2mim_vit_base_plain").backbone == "vit_base_patch16_224"


def test_simmim_resnet50_follows_the_reference_and_meanfill_is_the_papers_variant():
    assert get_preset("simmim_resnet50").fill == "none"
    assert get_preset("simmim_resnet50_meanfill").fill == "mean"
    assert get_preset("simmim_resnet50").token_point == "first"

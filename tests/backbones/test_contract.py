"""The backbone contract, run identically over every adapter family.

Adding a family: one adapter module in a2mim/backbones/ and one line in BACKBONES below.
"""

from __future__ import annotations

import pytest
import torch

from a2mim.backbones import adapter_classes, create_backbone
from a2mim.mim import MaskedImageModel, MIMConfig

IMG = 64
# (timm name, extra kwargs): low resolution keeps the suite fast on 2 CPU cores.
BACKBONES = [
    ("resnet18", {}),
    ("resnet50", {}),
    ("vit_tiny_patch16_224", {}),
    ("vit_small_patch16_224", {}),
    ("beit_base_patch16_224", {"use_abs_pos_emb": True, "global_pool": "token", "depth": 4}),
    ("convnext_atto", {}),
    ("swin_tiny_patch4_window7_224", {"window_size": 4}),
]


@pytest.fixture(scope="module", params=BACKBONES, ids=[b[0] for b in BACKBONES])
def adapter(request):
    name, kwargs = request.param
    torch.manual_seed(0)
    adapter = create_backbone(name, img_size=IMG, **kwargs)
    adapter.model.eval()
    adapter.timm_name, adapter.timm_kwargs = name, kwargs  # for building a model around it
    return adapter


def _features_at(adapter, img, point):
    captured = {}

    def edit(x):
        captured["x"] = x
        return x

    adapter.forward_features(img, point, edit)
    return captured["x"]


def test_every_family_is_covered():
    covered = {type(create_backbone(n, img_size=IMG, **kw)).__name__ for n, kw in BACKBONES}
    assert covered == {cls.__name__ for cls in adapter_classes()}


def test_point_shapes_match_feature_info(adapter):
    img = torch.randn(2, 3, IMG, IMG)
    info = {f["module"]: f for f in adapter.model.feature_info}
    for point in adapter.points:
        spec = adapter.point_spec(point)
        feats = _features_at(adapter, img, point)
        h = IMG // spec.stride
        mask = adapter.mask_at(torch.ones(2, h, h, dtype=torch.bool), point)
        chan = adapter.channel_view(torch.ones(spec.channels), point)
        # The mask (one singleton channel dim) and a per-channel vector broadcast exactly onto
        # the features: their channel count and spatial grid are the reported ones.
        assert torch.broadcast_shapes(mask.shape, feats.shape) == feats.shape
        assert torch.broadcast_shapes(chan.shape, feats.shape) == feats.shape
        assert int(mask.sum()) == 2 * h * h
        assert feats.numel() == mask.numel() * spec.channels
    # Stage points report exactly timm's feature_info.
    for point in adapter.points:
        spec = adapter.point_spec(point)
        assert (
            any(
                spec.channels == f["num_chs"] and spec.stride == f["reduction"]
                for f in info.values()
            )
            or point == adapter.first_point
        )


def test_final_features(adapter):
    img = torch.randn(2, 3, IMG, IMG)
    final = adapter.final_spec()
    last = adapter.model.feature_info[-1]
    assert (final.channels, final.stride) == (last["num_chs"], last["reduction"])
    out = adapter.final_to_bchw(adapter.forward_features(img))
    assert out.shape == (2, final.channels, IMG // final.stride, IMG // final.stride)


def test_no_edit_equals_timm_forward_features(adapter):
    img = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(adapter.forward_features(img), adapter.model.forward_features(img))


def _model_for(adapter, **overrides) -> MaskedImageModel:
    middle = adapter.points[len(adapter.points) // 2]
    cfg = MIMConfig(
        backbone=adapter.timm_name,
        backbone_kwargs=adapter.timm_kwargs,
        img_size=IMG,
        mask_patch_size=32,
        token_point=middle,
        token_gamma=None,
        **overrides,
    )
    model = MaskedImageModel(cfg)
    model.encoder.load_state_dict(adapter.model.state_dict())
    return model.eval()


def test_empty_mask_equals_plain_forward(adapter):
    model = _model_for(adapter)
    img = torch.randn(2, 3, IMG, IMG)
    empty = torch.zeros(2, 2, 2, dtype=torch.bool)
    with torch.no_grad():
        plain = adapter.final_to_bchw(adapter.model.forward_features(img))
        assert torch.equal(model.encode(img, empty), plain)


def test_mask_acts_only_through_the_token(adapter):
    model = _model_for(adapter, fill="none")
    img = torch.randn(2, 3, IMG, IMG)
    mask = torch.tensor([[[True, False], [False, True]], [[False, False], [True, False]]])
    with torch.no_grad():
        plain = model.encode(img, None)
        model.token.token.normal_()
        assert not torch.allclose(model.encode(img, mask), plain)
        model.token.token.zero_()  # a zero token added to the features changes nothing
        assert torch.equal(model.encode(img, mask), plain)


def test_gradients_reach_the_token(adapter):
    model = _model_for(adapter).train()
    out = model(torch.randn(2, 3, IMG, IMG), generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    assert model.token.token.grad is not None
    assert model.token.token.grad.abs().sum() > 0
    assert model.decoder.proj.weight.grad.abs().sum() > 0

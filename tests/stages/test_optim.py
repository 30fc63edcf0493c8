import pytest
import torch

from a2mim.mim import MaskedImageModel, get_preset
from a2mim.train.optim import OptimConfig, build_optimizer, build_scheduler


def test_token_lr_scale_is_applied_once():
    model = MaskedImageModel(get_preset("a2mim_resnet18"))
    cfg = OptimConfig(warmup_epochs=1, min_lr=0.0)
    opt = build_optimizer(model.param_groups(0.05), cfg, lr=1e-3)
    sched = build_scheduler(opt, cfg, total_steps=100, steps_per_epoch=10)
    for step in (0, 5, 10, 50):
        sched.step_update(step)
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        assert lrs["token"] == pytest.approx(0.1 * lrs["decay"])
        assert lrs["no_decay"] == pytest.approx(lrs["decay"])
    sched.step_update(10)  # end of warm-up: the full scaled lr
    assert {g["name"]: g["lr"] for g in opt.param_groups}["decay"] == pytest.approx(1e-3)
    assert isinstance(opt, torch.optim.AdamW)

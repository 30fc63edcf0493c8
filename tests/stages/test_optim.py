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


def _lr_at(cfg, total, per_epoch, epoch):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = build_scheduler(opt, cfg, total, per_epoch)
    sched.step_update(round(epoch * per_epoch))
    return opt.param_groups[0]["lr"]


def test_step_schedule_decays_exactly_at_the_milestone_epoch():
    # mmcv's step policy: the warm-up is not a prefix (timm's default would step at 7 + 2).
    cfg = OptimConfig(warmup_epochs=2, warmup_lr=0.0, schedule="step", step_epochs=(7,))
    assert _lr_at(cfg, 100, 10, 6.9) == pytest.approx(1.0)  # the last iteration of epoch 6
    assert _lr_at(cfg, 100, 10, 7) == pytest.approx(0.1)
    assert _lr_at(cfg, 100, 10, 1) == pytest.approx(0.5)  # linear warm-up from warmup_lr


@pytest.mark.parametrize("milestone", [10, 700])
def test_step_milestone_outside_the_run_is_a_config_error(milestone):
    from a2mim.config import ConfigError

    cfg = OptimConfig(schedule="step", step_epochs=(milestone,))
    with pytest.raises(ConfigError, match=r"never decay.*optim.step_epochs"):
        build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), cfg, 100, 10)

"""Distributed training for real: 2-process gloo runs under torchrun against 1-process runs.

Tolerances were measured on this machine (2 CPU cores, torch 2.14, OMP_NUM_THREADS=1) and hold
with margin; where the two runs differ by design (per-rank BatchNorm statistics and focal
frequency weights, as in the reference without SyncBN) the test checks the mechanism exactly at
the first step and bounds the drift of the loss curve after it.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from a2mim import predictions
from a2mim.data.imagefolder import ImageFolderDataset
from a2mim.data.transforms import eval_transform, pretrain_transform
from a2mim.mim import MaskedImageModel
from a2mim.stages import pretrain
from a2mim.train import distributed
from a2mim.train.classify import evaluate, load_classifier
from a2mim.train.distributed import DistributedEnvError, init_distributed, local_rows, rank_seed
from a2mim.train.sampling import EpochSampler, SeededDataset, mix_seed

DIST_VARS = distributed.ENV_VARS


@pytest.fixture(scope="module")
def fmnist(fmnist_subset) -> Path:
    return fmnist_subset(8, 3)  # 80 train, 30 val; made once (conftest.py)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _launch(nproc: int, args: list[str]) -> str:
    """Run ``a2mim <args>`` as ``nproc`` processes (torchrun) or one plain process; stdout."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "a2mim.cli", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "a2mim.cli",
            *args,
        ]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout


def _pretrain(cfg_file: Path, out: Path, nproc: int, batch: int, *sets: str) -> list[dict]:
    sets_ = ["--set", f"batch_size={batch}", *[x for s in sets for x in ("--set", s)]]
    _launch(nproc, ["pretrain", "--config", str(cfg_file), "--out", str(out), *sets_])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _pretrain_cfg(tmp_path: Path, root: Path, preset: str) -> Path:
    path = tmp_path / "pretrain.yaml"
    cfg = {
        "scale": "tiny",
        "model": {"preset": preset},
        "data": {"root": str(root)},
        "optim": {"base_lr": 1e-3, "lr_batch_divisor": 16, "warmup_epochs": 0.5},
        "epochs": 2,  # 80 images / global batch 16 = 5 steps per epoch: 10 steps
        "ckpt_every_steps": 1000,
        "log_every_steps": 1,
        "figure_every_epochs": 100,
        "figure_images": 2,
        "progress": False,
        "track": False,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _encoder(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "encoder.pt", weights_only=True)["state_dict"]


# --------------------------------------------------------------------------- env and helpers


def test_incomplete_env_names_the_missing_variables(monkeypatch):
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(DistributedEnvError, match=r"\$MASTER_ADDR, \$MASTER_PORT are not set"):
        init_distributed("cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(DistributedEnvError, match=r"RANK=2 is outside \[0, WORLD_SIZE=2\)"):
        init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DistributedEnvError, match=r"\$WORLD_SIZE must be an integer"):
        init_distributed("cpu")
    assert not torch.distributed.is_initialized()


def test_single_process_joins_no_group(monkeypatch):
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    assert init_distributed("cpu") == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "1")  # Submitit exports this for a one-task job
    assert init_distributed("auto") == (0, 1)
    assert not torch.distributed.is_initialized()
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    distributed.teardown()  # no group: nothing to do


def test_local_rows_are_the_samples_each_rank_draws():
    """Row ``j`` of rank ``r``'s micro-batch is row ``j * world + r`` of the global one."""
    n, batch, world = 37, 4, 3
    usable = (n // (batch * world)) * batch * world
    whole = [i for _, i in EpochSampler(n, 5, 2, usable=usable)]
    shards = [[i for _, i in EpochSampler(n, 5, 2, 0, r, world, usable)] for r in range(world)]
    for k in range(usable // (batch * world)):
        global_micro = torch.tensor(whole[k * batch * world : (k + 1) * batch * world])
        for r in range(world):
            mine = torch.tensor(shards[r][k * batch : (k + 1) * batch])
            assert torch.equal(local_rows(global_micro, r, world), mine)


def test_rank_seed_keeps_rank_zero_and_separates_the_others():
    seeds = [rank_seed(1234, r) for r in range(4)]
    assert seeds[0] == 1234
    assert len(set(seeds)) == 4


WORKER = """
import sys, pathlib, torch, torch.distributed as dist
from a2mim.train import distributed as d

info = d.init_distributed("cpu")
assert d.init_distributed("cpu") == info == (dist.get_rank(), 2), info  # idempotent
assert dist.get_backend() == "gloo"
rank = info[0]
assert d.resolve_device("cpu") == torch.device("cpu")
assert d.mean_over_ranks(torch.tensor([float(rank), 4.0])).tolist() == [0.5, 4.0]
bn = torch.nn.BatchNorm1d(3)
bn.running_mean.fill_(rank + 1.0)
d.broadcast_buffers(bn)
assert bn.running_mean.tolist() == [1.0, 1.0, 1.0]
d.teardown()
assert not dist.is_initialized()
d.teardown()
pathlib.Path(sys.argv[1], f"ok{rank}").write_text("ok")  # files: the ranks share one stdout
"""


def test_two_gloo_processes_join_agree_and_leave(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(script),
        str(tmp_path),
    ]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.glob("ok*")) == ["ok0", "ok1"]


# --------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_simmim_vit_two_processes_equal_one_process(fmnist, tmp_path):
    """LayerNorm only, no frequency loss: 2 x 8 equals 1 x 16 up to float summation order.

    Measured over 10 steps (seeds 0 and 1): loss curves within 1.6e-7 relative; the encoder's
    global relative L2 difference 3e-7 / 6.8e-7; the largest elementwise difference 7.6e-6, in the
    attention key biases, whose true gradient is zero (softmax ignores a shift of every key), so
    AdamW turns the float noise of their gradient into lr-sized steps.
    """
    cfg_file = _pretrain_cfg(tmp_path, fmnist, "simmim_vit_tiny")
    one = _pretrain(cfg_file, tmp_path / "one", 1, 16)
    two = _pretrain(cfg_file, tmp_path / "two", 2, 8)
    assert [x["step"] for x in two] == list(range(1, 11))  # rank 0 alone wrote each step once
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), a["step"]
    enc_one, enc_two = _encoder(tmp_path / "one"), _encoder(tmp_path / "two")
    num = sum(((enc_one[k] - enc_two[k]).double() ** 2).sum() for k in enc_one)
    den = sum((enc_one[k].double() ** 2).sum() for k in enc_one)
    assert math.sqrt(num / den) < 5e-6
    for key in enc_one:
        torch.testing.assert_close(enc_two[key], enc_one[key], rtol=0, atol=5e-5, msg=key)
    resolved = yaml.safe_load((tmp_path / "two" / "resolved_config.yaml").read_text())
    assert resolved["derived"]["world_size"] == 2
    assert resolved["derived"]["global_batch"] == 16


def _first_global_batch(cfg_file: Path, seed: int = 0):
    """The stage's first global micro-batch (images, masks) and its initial model, rebuilt here
    from the documented conventions: epoch-0 order, per-sample seeded augmentation, masks from
    one generator seeded by (seed, step 0, micro 0)."""
    cfg = pretrain.load_config({**yaml.safe_load(cfg_file.read_text()), "batch_size": 16})
    mim_cfg = cfg.mim_config()
    dataset = ImageFolderDataset(cfg.data.root, cfg.data.split)
    usable = (len(dataset) // 16) * 16
    keys = list(EpochSampler(len(dataset), seed, 0, usable=usable))[:16]
    seeded = SeededDataset(
        dataset, pretrain_transform(mim_cfg.img_size, cfg.data.crop_scale, cfg.data.hflip), seed
    )
    img = torch.stack([seeded[k][0] for k in keys])
    torch.manual_seed(seed)
    model = MaskedImageModel(mim_cfg).train()
    mask = model.masker(16, generator=torch.Generator().manual_seed(mix_seed(seed, 2, 0, 0, 0)))
    return model, img, mask


@pytest.mark.slow
def test_a2mim_resnet_two_processes_differ_only_by_per_rank_statistics(fmnist, tmp_path):
    """BatchNorm statistics and the focal frequency weights are per rank's batch.

    Step 1 (identical weights) is checked exactly: the 1-process loss is the model's loss on
    the rebuilt global batch, the 2-process loss the mean of its losses on rows 0::2 and 1::2
    (so images, augmentations and masks match and nothing else differs). Later steps drift;
    measured over 10 steps and 5 seeds, the spatial loss stayed within 6.5% relative (0.2% at
    steps 1-2) and the total loss within 32%, the 2-process frequency loss being the larger at
    step 1 (+3.5% to +9%): the focal loss of an 8-image mean residual exceeds that of a 16-image
    mean, since fewer residuals cancel.
    """
    cfg_file = _pretrain_cfg(tmp_path, fmnist, "a2mim_resnet18")
    one = _pretrain(cfg_file, tmp_path / "one", 1, 16)
    two = _pretrain(cfg_file, tmp_path / "two", 2, 8)

    model, img, mask = _first_global_batch(cfg_file)
    with torch.no_grad():
        whole = model(img, mask)
        shards = [model(local_rows(img, r, 2), local_rows(mask, r, 2)) for r in range(2)]
    for key in ("loss", "loss_spatial", "loss_freq"):
        assert one[0][key] == pytest.approx(getattr(whole, key).item(), rel=1e-5), key
        per_rank = sum(getattr(s, key).item() for s in shards) / 2
        assert two[0][key] == pytest.approx(per_rank, rel=1e-5), key
    assert two[0]["loss_freq"] > one[0]["loss_freq"]

    for a, b in zip(one, two, strict=True):
        limit = 0.01 if a["step"] <= 2 else 0.15
        assert b["loss_spatial"] == pytest.approx(a["loss_spatial"], rel=limit), a["step"]
        assert b["loss"] == pytest.approx(a["loss"], rel=0.6), a["step"]


@pytest.mark.slow
def test_two_process_finetune_evaluates_the_whole_val_set_once(fmnist, tmp_path):
    """A 2-process fine-tune (BatchNorm ResNet-18, Mixup, EMA): rank 0 alone writes and logs
    (one MLflow run, each step once); its top-1 / val loss are those of the saved model (and
    EMA) on all 30 validation images, which needs rank 0's BatchNorm statistics on both shards."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "ft"
    sets = {
        "data.root": str(fmnist),
        "batch_size": 8,
        "epochs": 2,
        "log_every_steps": 1,
        "ema_decay": 0.9,
        "progress": False,
        "tracking_uri": uri,
    }
    args = ["finetune", "--config", "tiny", "--out", str(out)]
    stdout = _launch(2, [*args, *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")]])
    metrics = json.loads((out / "metrics.json").read_text())
    assert stdout.count('"top1"') == 2  # both ranks return the same metrics; one file

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [x["step"] for x in lines if "loss" in x]
    assert train_steps == list(range(1, 11))  # 80 images / (2 x 8): 5 steps per epoch
    evals = [x for x in lines if "top1" in x]
    assert [x["epoch"] for x in evals] == [1, 2]
    assert evals[-1]["top1"] == metrics["top1"]

    # the per-sample predictions hold both shards, each sample once, in the dataset's order
    found = predictions.read(out / "predictions" / "final.npz")
    assert len(found.ids) == len(set(found.ids)) == 30
    assert found.score() == pytest.approx(metrics["top1"], abs=1e-9)

    val = ImageFolderDataset(fmnist, "val", transform=eval_transform(32, 1.0))
    assert list(found.label) == val.targets
    loader = torch.utils.data.DataLoader(val, batch_size=64)
    for ema, suffix in ((False, ""), (True, "_ema")):
        model, _ = load_classifier(out / "model.pt", ema=ema)
        res = evaluate(model, loader, torch.device("cpu"))
        assert res["n"] == 30
        assert metrics["top1" + suffix] == pytest.approx(res["top1"], abs=1e-9)
        assert metrics["top5" + suffix] == pytest.approx(res["top5"], abs=1e-9)
        assert metrics["val_loss" + suffix] == pytest.approx(res["loss"], rel=1e-5)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    assert (out / "mlflow_run_id").read_text().strip() == run_id
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == train_steps
    assert [m.step for m in client.get_metric_history(run_id, "top1")] == [5, 10]
    assert runs[0].data.params["derived.world_size"] == "2"
    assert runs[0].data.params["derived.global_batch"] == "16"

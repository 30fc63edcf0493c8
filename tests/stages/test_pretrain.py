"""The pretrain stage on real Fashion-MNIST images: config errors, a short run, corrupt images,
and exact resume after SIGKILL (a real subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from a2mim.config import ConfigError
from a2mim.stages import pretrain


@pytest.fixture(scope="module")
def fmnist(fmnist_subset) -> Path:
    return fmnist_subset(8, 2)  # conftest.py: made once per session


def _cfg(root: Path, **top) -> dict:
    cfg = {
        "scale": "tiny",
        "model": {"preset": "a2mim_resnet18"},
        "data": {"root": str(root)},
        "optim": {"base_lr": 1e-3, "lr_batch_divisor": 16, "warmup_epochs": 0.5},
        "epochs": 2,
        "batch_size": 16,
        "ckpt_every_steps": 2,
        "log_every_steps": 1,
        "progress": False,
    }
    cfg.update(top)
    return cfg


def test_unknown_key_lists_valid_keys(fmnist):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epoch'\].*did you mean 'epochs'"):
        pretrain.load_config({**_cfg(fmnist), "epoch": 3})
    with pytest.raises(ConfigError, match=r"optim\.base_lr: expected a number"):
        pretrain.load_config(_cfg(fmnist, optim={"base_lr": "fast"}))
    with pytest.raises(ConfigError, match=r"model\.overrides: unknown key"):
        pretrain.load_config(
            _cfg(fmnist, model={"preset": "a2mim_resnet18", "overrides": {"lamda": 1}})
        )
    with pytest.raises(ConfigError, match="unknown method preset"):
        pretrain.load_config(_cfg(fmnist, model={"preset": "a2mim_resnet5"}))


def test_short_run_writes_everything(fmnist, tmp_path):
    cfg = pretrain.load_config(_cfg(fmnist))
    metrics = pretrain.run(cfg, tmp_path)
    resolved = yaml.safe_load((tmp_path / "resolved_config.yaml").read_text())
    assert resolved["derived"]["steps_per_epoch"] == 80 // 16
    assert resolved["derived"]["lr"] == pytest.approx(1e-3)
    assert resolved["derived"]["mim"]["token_point"] == "stage2"
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 11))
    assert {"loss", "loss_spatial", "loss_freq", "lr", "img_per_s"} <= set(lines[0])
    assert metrics["final_loss"] == pytest.approx(lines[-1]["loss"])
    enc = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert enc["meta"]["backbone"] == "resnet18"
    assert not any(k.startswith(("token", "decoder")) for k in enc["state_dict"])
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "recon_ep0001.png",
        "recon_ep0002.png",
    ]


def test_corrupt_image_is_named_and_can_be_skipped(fmnist, tmp_path):
    import shutil

    root = tmp_path / "fm"
    shutil.copytree(fmnist, root)
    bad = next((root / "train" / "bag").iterdir())
    bad.write_bytes(bad.read_bytes()[:20])
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg(root, epochs=1)))
    cmd = [sys.executable, "-m", "a2mim.cli", "pretrain", "--config", str(cfg_file)]
    res = subprocess.run([*cmd, "--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert res.returncode == 2
    assert bad.name in res.stderr and "skip" in res.stderr
    assert not (tmp_path / "a" / "encoder.pt").exists()
    res = subprocess.run(
        [*cmd, "--out", str(tmp_path / "b"), "--set", "data.skip_corrupt=true"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert bad.name in res.stderr and "skipping a corrupt image" in res.stderr  # named when read
    assert (tmp_path / "b" / "encoder.pt").exists()


def test_skip_corrupt_covers_the_validation_split(fmnist, tmp_path):
    import shutil

    from a2mim.data.imagefolder import CorruptImageError

    root = tmp_path / "fm"
    shutil.copytree(fmnist, root)
    bad = sorted((root / "val").rglob("*.png"))[0]  # the first figure image
    bad.write_bytes(bad.read_bytes()[:20])
    cfg = _cfg(root, epochs=1, figure_images=2, track=False)
    with pytest.raises(CorruptImageError, match=bad.name):
        pretrain.run(pretrain.load_config(cfg), tmp_path / "a")
    assert not (tmp_path / "a" / "resolved_config.yaml").exists()  # refused before any output
    cfg["data"] = {**cfg["data"], "skip_corrupt": True}
    pretrain.run(pretrain.load_config(cfg), tmp_path / "b")
    assert (tmp_path / "b" / "figures" / "recon_ep0001.png").is_file()


def _run_cli(cfg_file: Path, out: Path, env) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "a2mim.cli",
            "pretrain",
            "--config",
            str(cfg_file),
            "--out",
            str(out),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_resume_after_sigkill_is_bit_identical(fmnist, tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg_file.write_text(
        yaml.safe_dump(_cfg(fmnist, epochs=3, ckpt_every_steps=3, tracking_uri=uri))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    full = _run_cli(cfg_file, tmp_path / "full", env)
    assert full.wait(timeout=300) == 0, full.stderr.read()

    killed_dir = tmp_path / "killed"
    proc = _run_cli(cfg_file, killed_dir, env)
    deadline = time.time() + 300
    while not (killed_dir / "checkpoint.pt").exists():
        assert proc.poll() is None, "finished before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "encoder.pt").exists()
    run_id = (killed_dir / "mlflow_run_id").read_text().strip()
    step_at_kill = torch.load(killed_dir / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step_at_kill < 15

    resumed = _run_cli(cfg_file, killed_dir, env)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(killed_dir / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 15
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    log_full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    log_resumed = (killed_dir / "metrics.jsonl").read_text().splitlines()

    def strip(lines):  # timings differ between runs; everything else must not
        return [{k: v for k, v in json.loads(x).items() if k != "img_per_s"} for x in lines]

    assert strip(log_full) == strip(log_resumed)

    # MLflow: the resumed process continued the same run and step axis, each step once.
    from mlflow.tracking import MlflowClient

    assert (killed_dir / "mlflow_run_id").read_text().strip() == run_id
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 16))
    expected = {json.loads(x)["step"]: json.loads(x)["loss"] for x in log_resumed}
    assert {m.step: m.value for m in history} == pytest.approx(expected)
    assert client.get_run(run_id).data.tags["stage"] == "pretrain"


def test_resume_refuses_a_different_config(fmnist, tmp_path):
    pretrain.run(pretrain.load_config(_cfg(fmnist, epochs=1)), tmp_path)
    before = (tmp_path / "resolved_config.yaml").read_text()
    with pytest.raises(ConfigError, match="different config"):
        pretrain.run(pretrain.load_config(_cfg(fmnist, epochs=1, seed=1)), tmp_path)
    assert (tmp_path / "resolved_config.yaml").read_text() == before  # the old run's record stays


def test_figure_batch_takes_every_image_of_a_split_smaller_than_figure_images(fmnist, tmp_path):
    import shutil

    root = tmp_path / "fm"
    shutil.copytree(fmnist, root)
    for folder in sorted((root / "val").iterdir())[1:]:
        shutil.rmtree(folder)  # one class of 2 validation images left, 8 figure images asked
    cfg = pretrain.load_config(_cfg(root, figure_images=8, track=False))
    imgs, _ = pretrain._figure_batch(cfg, cfg.mim_config())  # was an IndexError
    assert imgs.shape[0] == 2

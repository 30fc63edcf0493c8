"""Bad input to the CLI and the launcher: exit != 0, a message naming the problem and the fix,
and nothing half-written. Each case runs the real command line in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from a2mim import atomic, command
from a2mim.data.fashion_mnist import prepare_fashion_mnist

A2MIM = [sys.executable, "-m", "a2mim"]


def _a2mim(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*A2MIM, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _refused(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fmnist") / "fm"
    prepare_fashion_mnist(root, train_per_class=4, val_per_class=1)
    return root


def test_set_values_follow_yaml_1_2_numbers():
    assert command.parse_value("k", "1e-3") == 0.001
    assert command.parse_value("k", "-2E4") == -20000.0
    assert command.parse_value("k", "5") == 5 and command.parse_value("k", "true") is True
    assert command.parse_value("k", "yes") == "yes"  # YAML 1.1's boolean is a string in 1.2
    assert command.parse_value("k", "[0.5, 1e-2]") == [0.5, 0.01]


def test_set_float_in_e_notation_is_accepted(fmnist, tmp_path):
    result = _a2mim(
        "check", "--", "pretrain", "--config", "tiny", "--out", str(tmp_path / "run"),
        "--set", f"data.root={fmnist}", "--set", "optim.base_lr=1e-3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "ready to run" in result.stdout


def test_set_with_broken_yaml_names_the_key_and_the_fix(tmp_path):
    out = tmp_path / "run"
    result = _a2mim("pretrain", "--config", "tiny", "--out", str(out), "--set", "x=[0.5,")
    _refused(result, "--set x=[0.5,", "not valid YAML", "close brackets")
    assert not out.exists()


def test_set_of_a_mapping_merges_into_the_recipes_mapping(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump({"model": {"preset": "a2mim_resnet18", "overrides": {"freq_weight": 1.0}}})
    )
    args = command.parse(
        ["pretrain", "--config", str(recipe), "--out", "o",
         "--set", "model.overrides={freq_omega: false}", "--set", "model.overrides.mask_ratio=0.5"]
    )  # fmt: skip
    overrides = command.config_data("pretrain", args)["model"]["overrides"]
    assert overrides == {"freq_weight": 1.0, "freq_omega": False, "mask_ratio": 0.5}


@pytest.mark.parametrize(
    ("backbone", "phrases"),
    [
        ("resnet51", ["backbone 'resnet51' is not a timm model", "timm.list_models()"]),
        ("efficientnet_b0", ["has no backbone adapter", "a2mim/backbones/"]),
    ],
    ids=["unknown", "no-adapter"],
)
def test_pretrain_backbone_without_adapter_is_refused_before_training(
    fmnist, tmp_path, backbone, phrases
):
    out = tmp_path / "run"
    result = _a2mim(
        "pretrain", "--config", "tiny", "--out", str(out), "--set", f"data.root={fmnist}",
        "--set", f"model.overrides.backbone={backbone}",
    )  # fmt: skip
    _refused(result, *phrases)
    assert not out.exists()


def test_launch_checks_before_it_submits(fmnist, tmp_path):
    jobs, out = tmp_path / "jobs", tmp_path / "run"
    result = _a2mim(
        "launch", "--job-dir", str(jobs), "--", "pretrain", "--config", "tiny", "--out", str(out),
        "--set", f"data.root={fmnist}", "--set", "model.overrides.backbone=resnet51",
    )  # fmt: skip
    _refused(result, "nothing submitted", "is not a timm model")
    assert not jobs.exists() and not out.exists()
    assert "submitted job" not in result.stdout


def test_launch_never_clears_a_folder_it_did_not_make(tmp_path):
    run = tmp_path / "finished_run"
    run.mkdir()
    (run / "encoder.pt").write_bytes(b"weights")
    (run / "notes.txt").write_text("mine")
    result = _a2mim(
        "launch", "--job-dir", str(run), "--", "pretrain", "--config", "tiny",
        "--out", str(tmp_path / "other"),
    )  # fmt: skip
    _refused(result, f"--job-dir {run} is not empty and was not made by `a2mim launch`")
    assert sorted(p.name for p in run.iterdir()) == ["encoder.pt", "notes.txt"]
    # nor a job folder that would hold the run folder (the next launch would clear it)
    result = _a2mim(
        "launch", "--job-dir", str(tmp_path / "j"), "--", "pretrain", "--config", "tiny",
        "--out", str(tmp_path / "j" / "run"),
    )  # fmt: skip
    _refused(result, "holds the run folder")


def test_init_that_is_a_text_file_says_what_it_is(fmnist, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("epoch 3: loss 0.41\n")
    out = tmp_path / "run"
    result = _a2mim(
        "finetune", "--config", "tiny", "--out", str(out), "--init", str(notes),
        "--set", f"data.root={fmnist}",
    )  # fmt: skip
    _refused(result, f"{notes} is not a checkpoint: it is a text file", "encoder.pt of a pretrain")
    assert not out.exists()


def test_sigkilled_writer_leaves_a_temp_file_that_the_next_write_removes(tmp_path):
    target = tmp_path / "checkpoint.pt"
    script = (
        "import os, signal, sys\n"
        "from a2mim.atomic import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'x' * (16 << 20))\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(target)], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    left = list(tmp_path.glob(".checkpoint.a2mim-*.pt.tmp"))
    assert len(left) == 1 and left[0].stat().st_size == 16 << 20
    mine = tmp_path / ".checkpoint.user.pt.tmp"  # a file the tool did not write: kept
    mine.write_text("keep")
    with atomic.atomic_path(target) as tmp:
        live = list(tmp_path.glob(".checkpoint.a2mim-*.pt.tmp"))
        assert live == [tmp]  # the dead writer's file is gone, this live writer's is there
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and mine.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, mine.name])


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs (root only), unmounted afterwards."""
    mount = tmp_path / "small_fs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_during_a_checkpoint_says_so_and_where(fmnist, tiny_fs, tmp_path):
    out = tiny_fs / "run"
    result = _a2mim(
        "pretrain", "--config", "tiny", "--out", str(out), "--set", f"data.root={fmnist}",
        "--set", "epochs=1", "--set", "batch_size=16", "--set", "ckpt_every_steps=1",
        "--set", "track=false",
        "--set", "progress=false", timeout=300,
    )  # fmt: skip
    _refused(result, "no space left on device while writing", str(out), "free space")
    assert not list(out.glob("*.tmp")) and not (out / "checkpoint.pt").exists()


def test_check_of_a_missing_root_is_an_error_unless_planning_elsewhere(tmp_path):
    """`a2mim check` (what `a2mim launch` runs before it submits) refuses a data.root that
    does not exist; A2MIM_PLAN_ELSEWHERE=1 (the workflow's plan_elsewhere) makes it a warning."""
    argv = ["check", "--", "linprobe", "--config", "tiny", "--out", str(tmp_path / "run")]
    argv += ["--set", f"data.root={tmp_path / 'nope'}"]
    _refused(_a2mim(*argv), f"data.root: {tmp_path / 'nope'} does not exist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "A2MIM_PLAN_ELSEWHERE": "1"}
    result = subprocess.run([*A2MIM, *argv], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "WARNING (plan_elsewhere" in result.stderr and "does not exist" in result.stderr


@pytest.mark.parametrize(
    ("stage", "recipe", "key"),
    [
        ("pretrain", "tiny", "epochs=0"),
        ("pretrain", "tiny", "epochs=-1"),
        ("pretrain", "tiny", "batch_size=0"),
        ("pretrain", "tiny", "accum_steps=0"),
        ("pretrain", "tiny", "ckpt_every_steps=0"),
        ("pretrain", "tiny", "log_every_steps=0"),
        ("finetune", "tiny", "epochs=0"),
        ("linprobe", "tiny", "batch_size=0"),
    ],
)
def test_zero_counts_exit_2_naming_the_key_and_range_and_write_nothing(
    stage, recipe, key, tmp_path
):
    out = tmp_path / "run"
    name, value = key.split("=")
    result = _a2mim(stage, "--config", recipe, "--out", str(out), "--set", key)
    _refused(result, f"{name}: {value} is out of range; allowed: >= 1")
    assert not out.exists()

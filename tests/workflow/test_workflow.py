"""The Snakemake workflow plans what it should, lints clean, and refuses bad configs clearly."""

from __future__ import annotations

import copy

import pytest

from .conftest import job_stats, load_config, snakemake, write_config


def test_snakemake_lint_is_clean() -> None:
    result = snakemake("--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations" in result.stdout + result.stderr


def test_paper_dry_run_with_slurm_profile_plans_every_job() -> None:
    # The exact command of the README / issue (the word after --configfile is a file too: the
    # repository's `all_tables` shim makes it harmless).
    result = snakemake(
        "-n", "--profile", "profiles/slurm", "--configfile", "workflow/config/paper.yaml",
        "all_tables",
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    paper = load_config("paper")
    stats = job_stats(out)
    for stage in ("pretrain", "finetune", "linprobe", "detect", "segment"):
        assert stats.get(stage, 0) == len(paper.get(stage) or {}), (stage, stats)
    assert stats["table"] == 5 and stats["audit"] == 1 and stats["all_tables"] == 1
    launches = [line for line in out.splitlines() if line.startswith("Shell command: a2mim launch")]
    stages = ("pretrain", "finetune", "linprobe", "detect", "segment")
    figures = paper.get("analysis") or {}
    assert stats.get("analyze", 0) == len(figures) == 3
    assert len(launches) == sum(len(paper.get(s) or {}) for s in stages) + len(figures)
    # The slurm profile really selects the SLURM launcher and the paper's resources, even though
    # profiles/default is applied on top of it.
    assert all("--cluster slurm" in line for line in launches)
    training = [line for line in launches if "-- pretrain" in line or "-- finetune" in line]
    assert all("--gpus-per-node 8" in line and "--tasks-per-node 8" in line for line in training)
    # Segmentation resources match each recipe's per-GPU batch: R50 4 x 4, ViT-B 8 x 2.
    segment = [line for line in launches if "-- segment" in line]
    assert all(
        ("--gpus-per-node 8" if "upernet_vitb" in line else "--gpus-per-node 4") in line
        for line in segment
    )
    # Upstream checkpoints travel through the DAG.
    ft = next(line for line in launches if "-- finetune" in line and "a2mim_r50_300ep_a2" in line)
    assert "--init results/paper/runs/pretrain/a2mim_r50_300ep/encoder.pt" in ft
    # The "(Sup.)" transfer rows start from a supervised classifier (a finetune run's model.pt),
    # and their Epochs cell is that run's training epochs.
    sup = next(line for line in launches if "-- detect" in line and "detect/sup_vitb " in line)
    assert "--init results/paper/runs/finetune/scratch_vitb/model.pt" in sup
    assert "--tag pretrain_run=finetune/scratch_vitb --tag pretrain_epochs=300" in sup


def test_bare_invocation_runs_the_tiny_matrix_locally() -> None:
    result = snakemake("-n", "--forceall", "all_tables")  # whatever results/ already holds
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    tiny = load_config("tiny")
    assert job_stats(out)["pretrain"] == len(tiny["pretrain"])
    launches = [line for line in out.splitlines() if line.startswith("Shell command: a2mim launch")]
    assert launches and all("--cluster local" in line for line in launches)


def _mutated(tmp_path, mutate):
    cfg = copy.deepcopy(load_config("tiny"))
    mutate(cfg)
    return write_config(tmp_path / "bad.yaml", cfg)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.update(pretrian={}), "pretrian"),
        (lambda c: c["pretrain"]["a2mim_r18"].update(recipie="tiny"), "recipie"),
        (lambda c: c["datasets"]["fmnist"]["prepare"].update(train_per_class="200"), "'200'"),
        (lambda c: c["finetune"]["a2mim_r18"].update(init="nope"), "init 'nope' is not a pretrain"),
        (
            lambda c: c["detect"]["sup_r18"].update(init="finetune/nope"),
            "init 'finetune/nope' is not a finetune run",
        ),
        (
            lambda c: c["finetune"]["a2mim_r18"].update(init="finetune/scratch_r18"),
            "a supervised init (finetune/<run>) is for linprobe, detect and segment",
        ),
        (
            lambda c: c["segment"]["sup_r18"].update(init="linprobe/a2mim_r18"),
            "name a pretrain run, or finetune/<run>",
        ),
        (lambda c: c["finetune"]["a2mim_r18"].update(data="in1k"), "data 'in1k' is not a key"),
        (
            lambda c: c["finetune"]["a2mim_r18"].update(
                cells=["table1_resnet50_in1k/MAE/fast_lin"]
            ),
            "has no row 'MAE'",
        ),
        (lambda c: c.update(scale="huge"), "huge"),
    ],
    ids=[
        "unknown-top-key",
        "unknown-run-key",
        "string-int",
        "init",
        "sup-init",
        "sup-init-finetune",
        "init-stage",
        "data",
        "cell",
        "scale",
    ],
)
def test_bad_config_is_refused_naming_the_problem(tmp_path, mutate, message) -> None:
    path = _mutated(tmp_path, mutate)
    result = snakemake("-n", f"--configfile={path}", "all_tables")
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in out, out[-3000:]


def test_seeded_runs_get_one_job_folder_and_tag_each_and_follow_their_init(tmp_path) -> None:
    """`seeds:` expands a run into <name>.seed<s>: own folder, `--set seed=`, tags seed and
    dataset; a seeded init follows the seed, an unseeded one is shared, and runs or figures
    naming a seeded run get its first seed."""
    cfg = copy.deepcopy(load_config("tiny"))
    cfg["pretrain"]["a2mim_r18"]["seeds"] = [0, 1]
    cfg["finetune"]["a2mim_r18"]["seeds"] = [1, 2]
    cfg["datasets"]["fmnist"]["paper"] = "imagenet-1k"  # (a toy stand-in declared the paper's)
    path = write_config(tmp_path / "seeded.yaml", cfg)
    result = snakemake("-n", "--forceall", f"--configfile={path}", "all_tables")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    stats = job_stats(out)
    assert stats["pretrain"] == len(cfg["pretrain"]) + 1
    assert stats["finetune"] == len(cfg["finetune"]) + 1
    assert stats["linprobe"] == 4  # tiny.yaml: two seeds per linear probe
    launches = [line for line in out.splitlines() if line.startswith("Shell command: a2mim launch")]

    def launch(stage, name):
        return next(line for line in launches if f"--out results/tiny/runs/{stage}/{name} " in line)

    ft = launch("finetune", "a2mim_r18.seed1")
    assert (
        "--set seed=1" in ft
        and "--tag seed=1" in ft
        and "--tag seed_group=finetune/a2mim_r18" in ft
    )
    assert "--init results/tiny/runs/pretrain/a2mim_r18.seed1/encoder.pt" in ft
    assert "--tag dataset=fmnist --tag paper_dataset=imagenet-1k" in ft
    # seed 2 has no pretrain seed 2: the first pretrain seed
    ft2 = launch("finetune", "a2mim_r18.seed2")
    assert "--init results/tiny/runs/pretrain/a2mim_r18.seed0/encoder.pt" in ft2
    # the seeded probe of the unseeded SimMIM encoder: both seeds start from the one encoder
    for seed in (0, 1):
        probe = launch("linprobe", f"simmim_r18.seed{seed}")
        assert "--init results/tiny/runs/pretrain/simmim_r18/encoder.pt" in probe
        assert f"--set seed={seed}" in probe
    # an unseeded detect run and figure 1 take the first seed of their seeded runs
    det = launch("detect", "a2mim_r18")
    assert "--init results/tiny/runs/pretrain/a2mim_r18.seed0/encoder.pt" in det
    assert "--tag seed=" not in det
    fig = next(line for line in launches if "-- analyze figure1" in line)
    assert "A2MIM=results/tiny/runs/finetune/a2mim_r18.seed1" in fig
    # the audit (and the experiment table of every run) waits for every run
    assert stats["audit"] == 1


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["linprobe"]["a2mim_r18"].update(seeds=[]), "seeds"),
        (lambda c: c["linprobe"]["a2mim_r18"].update(seeds=[1, 1]), "seeds"),
        (lambda c: c["datasets"]["fmnist"].update(paper="imagenet"), "imagenet"),
        (
            lambda c: c["linprobe"]["a2mim_r18"].update(set={"seed": 3}),
            "give either seeds: (one run per seed) or set: {seed: ...}",
        ),
        (
            lambda c: c["linprobe"].update(**{"a2mim_r18.seed1": c["linprobe"]["simmim_r18"]}),
            "seed 1 makes run 'a2mim_r18.seed1', which the config also names",
        ),
    ],
    ids=["no-seed", "same-seed-twice", "unknown-paper-dataset", "set-seed", "name-clash"],
)
def test_bad_seeds_and_paper_datasets_are_refused(tmp_path, mutate, message) -> None:
    path = _mutated(tmp_path, mutate)
    result = snakemake("-n", f"--configfile={path}", "all_tables")
    assert result.returncode != 0
    assert message in result.stdout + result.stderr

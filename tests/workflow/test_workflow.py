"""The Snakemake workflow plans what it should, lints clean, and refuses bad configs clearly."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import yaml

from .conftest import ROOT, job_stats, load_config, snakemake, write_config


def test_snakemake_lint_is_clean() -> None:
    result = snakemake("--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations" in result.stdout + result.stderr


PAPER_DRY_RUN = (
    "-n", "--profile", "profiles/slurm", "--configfile", "workflow/config/paper.yaml", "all_tables",
)  # fmt: skip


def _paper_roots_missing() -> list[str]:
    return [
        name
        for name, spec in load_config("paper")["datasets"].items()
        if not os.path.exists(spec["root"])
    ]


def test_paper_run_stops_before_submitting_listing_missing_roots_and_backend() -> None:
    """Without the paper's datasets (and detectron2) here, the dry run plans every job and warns
    about each missing root and the backend; the real run stops before submitting anything,
    naming every missing root and the backend with their fixes."""
    missing = _paper_roots_missing()
    d2 = importlib.util.find_spec("detectron2") is not None
    if not missing and d2:
        pytest.skip("this machine has the paper's datasets and detectron2")
    env = {**os.environ, "A2MIM_PLAN_ELSEWHERE": ""}
    dry = snakemake(*PAPER_DRY_RUN, env=env)
    out = dry.stdout + dry.stderr
    assert dry.returncode == 0, out[-3000:]
    assert "a2mim pre-flight WARNING (dry run: a real run on this machine stops here" in out
    for name in missing:
        assert f"datasets.{name}.root: " in out, out[-3000:]
    real = snakemake(*PAPER_DRY_RUN[1:], env=env)  # the same command without -n
    out = real.stdout + real.stderr
    assert real.returncode != 0, out[-3000:]
    assert "nothing was run or submitted" in out and "Shell command: a2mim launch" not in out
    assert "Submitted" not in out and "rule pretrain:" not in out
    for name in missing:
        assert f"datasets.{name}.root: " in out and f"set datasets.{name}.root" in out, out
    if not d2:
        assert "detectron2 is not installed" in out
        assert "set: {backend: torchvision}" in out
        assert "detect.a2mim_r50_300ep" in out
    assert "plan_elsewhere: true" in out and "A2MIM_PLAN_ELSEWHERE=1" in out  # the opt-out


def test_paper_dry_run_with_slurm_profile_plans_every_job() -> None:
    # The exact command of the README / issue (the word after --configfile is a file too: the
    # repository's `all_tables` shim makes it harmless), planning on a machine without the
    # paper's data: the opt-out turns missing roots and backends into labelled warnings.
    result = snakemake(*PAPER_DRY_RUN, env={**os.environ, "A2MIM_PLAN_ELSEWHERE": "1"})
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    for name in _paper_roots_missing():
        assert "WARNING (plan_elsewhere: planning on a machine other than the jobs'" in out
        assert f"datasets.{name}.root: " in out
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
        # the pre-flight: what used to fail only inside the job
        (
            lambda c: c["pretrain"]["a2mim_r18"].update(set={"epoch": 3}),
            "pretrain.a2mim_r18 (`a2mim pretrain --config tiny ...`): ",
        ),
        (lambda c: c["finetune"]["a2mim_r18"].update(set={"epochs": "three"}), "'three'"),
        (
            lambda c: c["pretrain"]["a2mim_r18"].update(set={"model.overrides.backbone": "vgg11"}),
            "has no backbone adapter",
        ),
        (
            lambda c: c["datasets"].update(fmnist={"root": str(ROOT / "docs")}),
            "does not hold what this stage reads",
        ),
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
        "set-unknown-key",
        "set-ill-typed",
        "set-backbone-without-adapter",
        "root-layout",
    ],
)
def test_bad_config_is_refused_naming_the_problem(tmp_path, mutate, message) -> None:
    path = _mutated(tmp_path, mutate)
    result = snakemake("-n", f"--configfile={path}", "all_tables")
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in out, out[-3000:]


def test_missing_external_root_stops_a_real_run_and_warns_in_a_dry_run(tmp_path) -> None:
    cfg = copy.deepcopy(load_config("tiny"))
    missing = tmp_path / "no-such-imagenet"
    cfg["datasets"]["fmnist"] = {"root": str(missing)}
    path = write_config(tmp_path / "missing.yaml", cfg)
    env = {**os.environ, "A2MIM_PLAN_ELSEWHERE": ""}
    # a dry run plans and says that a real run here would stop
    result = snakemake("-n", "--forceall", f"--configfile={path}", "all_tables", env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "a2mim pre-flight WARNING (dry run: a real run on this machine stops here" in out
    assert f"datasets.fmnist.root: {missing} does not exist" in out, out[-3000:]
    # the real run stops before any job
    result = snakemake("--forceall", f"--configfile={path}", "all_tables", env=env)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    assert f"datasets.fmnist.root: {missing} does not exist" in out, out[-3000:]
    assert "set datasets.fmnist.root in the workflow config" in out
    assert "pretrain.a2mim_r18" in out  # the runs it stops
    assert "scenes" not in out.split("pre-flight found", 1)[1]  # made by a rule: exempt
    assert "nothing was run or submitted" in out and "rule pretrain:" not in out
    # the opt-out, as a config key: the same problem becomes a labelled warning, the plan is made
    cfg["plan_elsewhere"] = True
    path = write_config(tmp_path / "elsewhere.yaml", cfg)
    result = snakemake("-n", "--forceall", f"--configfile={path}", "all_tables", env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "a2mim pre-flight WARNING (plan_elsewhere" in out
    assert f"datasets.fmnist.root: {missing} does not exist" in out
    assert job_stats(out)["pretrain"] == len(cfg["pretrain"])


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


def test_paper_resources_are_sized_per_stage() -> None:
    from a2mim.workflow import Matrix

    matrix = Matrix(load_config("paper"))
    train = matrix.resources("pretrain", next(iter(load_config("paper")["pretrain"])))
    seg = matrix.resources("segment", next(iter(load_config("paper")["segment"])))
    fig = matrix.resources("analyze", "figure1")
    assert (train.tasks_per_node, train.mem_gb) == (8, 480)
    assert (seg.tasks_per_node, seg.gpus_per_node, seg.mem_gb) == (4, 4, 240)
    assert (fig.tasks_per_node, fig.gpus_per_node, fig.mem_gb) == (1, 1, 64)
    for res in (train, seg, fig):  # never more memory per task than a training task has
        assert res.mem_gb / res.tasks_per_node <= 480 / 8 + 4


def test_every_matrix_stage_of_the_registry_is_in_the_schema_and_the_cli() -> None:
    from a2mim import cli, stages

    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    for stage in stages.STAGES.values():
        assert stage.name in commands
        if stage.in_matrix:
            assert stage.name in schema["properties"], f"add {stage.name} to the schema"


def test_no_import_circle_and_the_waiting_launcher_does_not_import_torch() -> None:
    code = (
        "import sys; from a2mim import cli; cli.build_parser(); import a2mim.launch;"
        "print(sorted(m for m in ('torch', 'a2mim.cli') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split("\n")[0] == "['a2mim.cli']", out.stderr  # cli imported, torch not
    code = "import sys, a2mim.launch; print('a2mim.cli' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "False", out.stderr  # launch does not import the cli


def test_profile_installs_as_slurm_idempotently_and_never_over_a_foreign_one(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "XDG_CONFIG_HOME"}
    env["HOME"] = str(tmp_path)

    def install() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["make", "-s", "install-profile"], cwd=ROOT, env=env, capture_output=True, text=True
        )

    dest = tmp_path / ".config" / "snakemake" / "slurm"
    assert install().returncode == 0 and install().returncode == 0  # twice: idempotent
    assert sorted(p.name for p in dest.iterdir()) == [".a2mim-profile", "config.yaml"]
    assert (dest / "config.yaml").read_text() == (ROOT / "profiles/slurm/config.yaml").read_text()
    # (the paper matrix planned on a machine without its datasets: the pre-flight's opt-out)
    result = snakemake(
        "-n", "--profile", "slurm", "all_tables", env={**env, "A2MIM_PLAN_ELSEWHERE": "1"}
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    launches = [line for line in out.splitlines() if line.startswith("Shell command: a2mim launch")]
    assert launches and all("--cluster slurm" in line for line in launches)
    # A `slurm` profile the user made is left alone, and said so.
    (dest / ".a2mim-profile").unlink()
    (dest / "config.yaml").write_text("jobs: 3\n")
    again = install()
    assert again.returncode == 0 and "not installed by a2mim: left as is" in again.stdout
    assert (dest / "config.yaml").read_text() == "jobs: 3\n"
    assert not (dest / ".a2mim-profile").exists()


def test_preflight_remembers_passed_checks_until_an_input_changes(tmp_path, monkeypatch) -> None:
    from a2mim import command
    from a2mim.workflow import Matrix

    cfg = copy.deepcopy(load_config("tiny"))
    root = tmp_path / "fm"
    (root / "train" / "c0").mkdir(parents=True)
    (root / "val" / "c0").mkdir(parents=True)
    cfg["datasets"]["fmnist"] = {"root": str(root)}
    matrix, cache = Matrix(cfg), tmp_path / "cache"
    checked = []
    real_check = command.check
    monkeypatch.setattr(
        command, "check", lambda argv, **kw: checked.append(argv) or real_check(argv, **kw)
    )
    matrix.preflight(cache=cache)
    runs = len(checked)
    assert runs > 10 and len(list(cache.iterdir())) == runs
    matrix.preflight(cache=cache)
    assert len(checked) == runs  # nothing checked again
    (root / "extra").mkdir()  # the layout of the runs' data root changed: those are checked again
    matrix.preflight(cache=cache)
    uses_fm = sum(1 for argv in checked[:runs] if f'data.root="{root}"' in argv)
    assert uses_fm and len(checked) == runs + uses_fm

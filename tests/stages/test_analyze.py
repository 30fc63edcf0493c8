"""The analyze stage on real tiny runs (Fashion-MNIST, ResNet-18 at 32 px): figures 1, 3 and 5
through the CLI, their numbers checked against independent computations (the fine-tune run's own
top-1, the baseline interaction implementation, the Fourier functions on all images at once,
SimMIM's own loss), resuming the interaction estimate, MLflow, and the errors for wrong input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml

from a2mim.analysis.fourier import fourier_profile
from a2mim.analysis.interactions import (
    FAST_VS_REFERENCE_TOLERANCE,
    InteractionSampling,
    interaction_strength_reference_batched,
)
from a2mim.cli import main
from a2mim.config import ConfigError
from a2mim.data.imagefolder import ImageFolderDataset
from a2mim.data.transforms import eval_transform
from a2mim.stages import analyze, finetune, pretrain
from a2mim.train.classify import load_classifier

N_VAL = 40  # 4 per class
FAST = [  # the whole val split for occlusion, fewer interactions, on top of the tiny recipe
    "occlusion.num_images=null",
    "interactions.num_images=2",
    "interactions.n_pairs=4",
    "interactions.n_contexts=3",
    "fourier.num_images=20",
    "data.batch_size=16",
    "track=false",
    "progress=false",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fmnist(fmnist_subset) -> Path:
    return fmnist_subset(8, N_VAL // 10)  # conftest.py: made once per session


@pytest.fixture(scope="module")
def runs(fmnist, tmp_path_factory) -> dict[str, Path]:
    """Real one-epoch A²MIM and SimMIM pre-training runs and a fine-tune of the A²MIM encoder
    (6 epochs: well above chance, so occlusion changes its accuracy)."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for preset in ("a2mim_resnet18", "simmim_resnet18"):
        cfg = {
            "scale": "tiny",
            "model": {"preset": preset},
            "data": {"root": str(fmnist)},
            "optim": {"base_lr": 1e-3, "lr_batch_divisor": 16, "warmup_epochs": 0.5},
            "epochs": 1,
            "batch_size": 16,
            "figure_every_epochs": 100,
            "figure_images": 2,
            "progress": False,
            "track": False,
        }
        out[preset] = base / f"pre_{preset}"
        pretrain.run(pretrain.load_config(cfg), out[preset])
    cfg = {
        "scale": "tiny",
        "model": {"backbone": "resnet18", "img_size": 32},
        "data": {"root": str(fmnist), "scale": [0.35, 1.0], "test_crop_pct": 1.0},
        "optim": {"opt": "lamb", "base_lr": 2e-2, "lr_batch_divisor": 16, "warmup_epochs": 0.5},
        "init": str(out["a2mim_resnet18"] / "encoder.pt"),
        "epochs": 6,
        "batch_size": 16,
        "progress": False,
        "track": False,
    }
    out["finetune"] = base / "ft_a2mim"
    finetune.run(finetune.load_config(cfg), out["finetune"])
    return out


def _analyze(figure: str, out: Path, models: dict[str, Path | str], *sets: str) -> int:
    argv = ["analyze", figure, "--config", "tiny", "--out", str(out)]
    for label, path in models.items():
        argv += ["--model", f"{label}={path}"]
    for assignment in sets:
        argv += ["--set", assignment]
    return main(argv)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _curve(rows, model: str, panel: str) -> list[tuple[float, float]]:
    return [
        (float(r["x"]), float(r["y"])) for r in rows if (r["model"], r["panel"]) == (model, panel)
    ]


def _val_images(root: Path, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Independently read val images through the stages' evaluation transform (32 px, crop 1)."""
    ds = ImageFolderDataset(root, "val", transform=eval_transform(32, 1.0))
    items = [ds[i] for i in indices]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


# ------------------------------------------------------------------------------- figure 1


@pytest.fixture(scope="module")
def figure1_out(fmnist, runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("figure1")
    models = {"A2MIM": runs["finetune"], "random": "random"}
    assert _analyze("figure1", out, models, f"data.root={fmnist}", *FAST) == 0
    return out


def test_figure1_numbers_match_independent_computations(fmnist, runs, figure1_out):
    out = figure1_out
    for name in ("figure1.png", "figure1.svg", "figure1.csv", "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    rows = _rows(out / "figure1.csv")
    assert list(rows[0]) == ["model", "panel", "x", "y", "detail"]
    metrics = json.loads((out / "metrics.json").read_text())
    ft_top1 = json.loads((runs["finetune"] / "metrics.json").read_text())["top1"]
    assert ft_top1 > 10.0  # above chance, so the occlusion curve means something

    # occlusion: r = 0 on the whole val split is the fine-tune run's own evaluation
    occ = _curve(rows, "A2MIM", "occlusion_top1")
    assert [x for x, _ in occ] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert occ[0][1] == ft_top1 == metrics["A2MIM/top1"]
    assert all(y * N_VAL / 100 == pytest.approx(round(y * N_VAL / 100)) for _, y in occ)
    trapezoid = np.trapezoid([y for _, y in occ], [x for x, _ in occ]) / 0.9
    assert metrics["A2MIM/occlusion_auc"] == pytest.approx(trapezoid)

    # interactions: one value per order m = int(62 r); the baseline implementation, run here on
    # the same two images (indices 0 and 20 of 40), agrees; J is I over its mean
    ratios = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
    orders = [int(62 * r + 1e-9) for r in ratios]
    strength = _curve(rows, "A2MIM", "interaction_I")
    relative = _curve(rows, "A2MIM", "interaction_J")
    assert [x for x, _ in relative] == pytest.approx([m / 64 for m in orders])
    assert [r["detail"] for r in rows if r["panel"] == "interaction_J"][:13] == [
        f"m={m}" for m in orders
    ]
    sampling = InteractionSampling(grid=8, n_pairs=4, n_contexts=3, seed=0)
    model, _ = load_classifier(runs["finetune"] / "model.pt")
    images, labels = _val_images(fmnist, [0, 20])
    reference = interaction_strength_reference_batched(model, images, labels, sampling)
    ours = torch.tensor([y for _, y in strength], dtype=torch.float64)
    rtol, atol = FAST_VS_REFERENCE_TOLERANCE
    assert (ours - reference.strength_o).abs().max() <= rtol * reference.strength_o.max() + atol
    assert [y for _, y in relative] == pytest.approx((ours / ours.mean()).tolist())
    assert metrics["A2MIM/J_low"] == pytest.approx(sum(y for _, y in relative[:3]) / 3)  # r<=.1
    assert metrics["A2MIM/J_high"] == pytest.approx(sum(y for _, y in relative[-3:]) / 3)

    # the random-init classifier has its curves too, and the legend says what each curve is
    assert len(_curve(rows, "random", "occlusion_top1")) == 10
    assert len(_curve(rows, "random", "interaction_J")) == 13
    derived = yaml.safe_load((out / "resolved_config.yaml").read_text())["derived"]
    assert derived["models"]["A2MIM"]["legend"] == "A2MIM: a2mim_resnet18 + finetune [ft_a2mim]"
    assert derived["models"]["random"]["legend"] == "random: random init resnet18"
    assert sorted(metrics) == sorted(
        f"{m}/{k}"
        for m in ("A2MIM", "random")
        for k in ("top1", "occlusion_auc", "J_low", "J_mid", "J_high")
    )


def test_figure1_resumes_the_interaction_estimate(fmnist, runs, figure1_out, tmp_path):
    """A restart takes the images recorded in the state file and computes the others: image 0's
    record is doubled and image 1's dropped, as if the run had been killed after image 0."""
    out = tmp_path / "figure1"
    shutil.copytree(figure1_out, out)
    (state,) = (out / "state" / "A2MIM").glob("interactions_*.json")
    saved = json.loads(state.read_text())
    first, second = (saved["done"][k]["pair_interaction"] for k in ("0", "1"))
    doubled = [[2 * v for v in order] for order in first]
    saved["done"] = {"0": {**saved["done"]["0"], "pair_interaction": doubled}}
    state.write_text(json.dumps(saved))
    stale = out / "state" / "A2MIM" / "interactions_0123456789abcdef.json"
    stale.write_text("{}")  # a state file of an older checkpoint or config
    models = {"A2MIM": runs["finetune"], "random": "random"}
    assert _analyze("figure1", out, models, f"data.root={fmnist}", *FAST) == 0
    assert not stale.exists()
    done = json.loads(state.read_text())["done"]
    assert done["0"]["pair_interaction"] == doubled  # taken from the file, not recomputed
    assert done["1"]["pair_interaction"] == second  # recomputed, bit-identical
    expected = torch.tensor([doubled, second], dtype=torch.float64).abs().mean(dim=(0, 2))
    strength = [y for _, y in _curve(_rows(out / "figure1.csv"), "A2MIM", "interaction_I")]
    assert strength == pytest.approx(expected.tolist(), rel=1e-12)
    before = _rows(figure1_out / "figure1.csv")
    after = _rows(out / "figure1.csv")
    assert [r for r in after if r["panel"] == "occlusion_top1"] == [
        r for r in before if r["panel"] == "occlusion_top1"
    ]
    assert [r for r in after if r["model"] == "random"] == [
        r for r in before if r["model"] == "random"
    ]


# ------------------------------------------------------------------------------- figure 3


def test_figure3_matches_fourier_on_all_images_and_logs_to_mlflow(fmnist, runs, tmp_path):
    out = tmp_path / "figure3"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    models = {
        "A2MIM": runs["a2mim_resnet18"],
        "SimMIM": runs["simmim_resnet18"],
        "A2MIM-ft": runs["finetune"],
    }
    sets = [*FAST, "track=true", f"tracking_uri={uri}", f"data.root={fmnist}"]
    assert _analyze("figure3", out, models, *sets) == 0
    rows = _rows(out / "figure3.csv")
    metrics = json.loads((out / "metrics.json").read_text())

    # ResNet-18 at 32 px: maxpool + 8 blocks; layer4's maps are 1x1 and have no spectrum
    names = ["maxpool"] + [f"layer{i}.{b}" for i in range(1, 5) for b in range(2)]
    encoder = timm.create_model("resnet18", num_classes=0)
    state = torch.load(runs["a2mim_resnet18"] / "encoder.pt", weights_only=True)["state_dict"]
    encoder.load_state_dict(state)
    images, _ = _val_images(fmnist, [2 * k for k in range(20)])  # 20 of 40, evenly spaced
    expected = fourier_profile(encoder, names[:7], images)  # all 20 images in one batch
    delta = [r for r in rows if r["model"] == "A2MIM" and r["panel"] == "high_freq_delta_log_amp"]
    variance = _curve(rows, "A2MIM", "feature_variance")
    assert [r["detail"] for r in delta] == names[:7]
    assert [float(r["x"]) for r in delta] == pytest.approx([k / 8 for k in range(7)])
    assert [float(r["y"]) for r in delta] == pytest.approx(
        [e["delta_log_amp_pi"] for e in expected], rel=1e-5, abs=1e-6
    )
    assert [y for _, y in variance] == pytest.approx([e["variance"] for e in expected], rel=1e-6)
    assert metrics["A2MIM/high_freq_delta_last"] == pytest.approx(expected[-1]["delta_log_amp_pi"])
    for label in models:
        assert len(_curve(rows, label, "feature_variance")) == 7
    ft = _curve(rows, "A2MIM-ft", "feature_variance")
    assert ft != variance  # the fine-tuned network is another network

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run((out / "mlflow_run_id").read_text().strip())
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert (tags["stage"], tags["figure"], tags["scale"]) == ("analysis", "figure3", "tiny")
    assert tags["models"] == "A2MIM,SimMIM,A2MIM-ft" and tags["method"] == "a2mim,simmim"
    assert "layer4.0 (1x1 map)" in json.loads(tags["fourier_skipped"])["A2MIM"]
    assert run.data.metrics == pytest.approx(metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"figure3.png", "figure3.svg", "figure3.csv", "metrics.json"} <= artifacts

    # the same command again continues the run; another config in the folder starts a new one
    assert _analyze("figure3", out, models, *sets) == 0
    assert (out / "mlflow_run_id").read_text().strip() == run.info.run_id
    assert _analyze("figure3", out, models, *sets, "fourier.num_images=10") == 0
    new_id = (out / "mlflow_run_id").read_text().strip()
    assert new_id != run.info.run_id
    assert client.get_run(new_id).data.params["fourier.num_images"] == "10"
    assert client.get_run(run.info.run_id).data.params["fourier.num_images"] == "20"


# ------------------------------------------------------------------------------- figure 5


def test_figure5_same_masks_for_every_model(fmnist, runs, tmp_path):
    models = {"A2MIM": runs["a2mim_resnet18"], "+ SimMIM": runs["simmim_resnet18"]}
    sets = [*FAST, f"data.root={fmnist}"]
    assert _analyze("figure5", tmp_path, models, *sets) == 0
    rows = _rows(tmp_path / "figure5.csv")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (tmp_path / "figure5.png").stat().st_size > 0
    for label in models:
        assert [x for x, _ in _curve(rows, label, "masked_l1")] == [0.0, 10.0, 20.0, 30.0]
    # SimMIM's loss is the L1 over masked pixels, and every image has 10 of 16 cells masked, so
    # its loss is the mean of the per-image masked L1 computed by the stage
    simmim = [y for _, y in _curve(rows, "+ SimMIM", "masked_l1")]  # the CSV keeps the label
    assert metrics["_ SimMIM/recon_loss"] == pytest.approx(sum(simmim) / 4, rel=1e-5)
    assert metrics["A2MIM/recon_loss"] != pytest.approx(metrics["A2MIM/masked_l1"])  # focal+freq

    cfg = analyze.load_config(
        {"figure": "figure5", "models": [{"label": k, "path": str(v)} for k, v in models.items()],
         "data": {"root": str(fmnist)}, "reconstruction": {"image_indices": [3, 7]}}
    )  # fmt: skip
    infos = [analyze.inspect_run(k, str(v), "figure5", None) for k, v in models.items()]
    _, panel_rows, names = analyze.figure5(cfg, infos, tmp_path, torch.device("cpu"), print)
    assert names == ["#3", "#7"]
    (_, a2mim), (_, simmim_panels) = panel_rows
    assert torch.equal(a2mim["input"], simmim_panels["input"])
    assert torch.equal(a2mim["masked"], simmim_panels["masked"])  # same masks, both fill "mean"
    assert not torch.equal(a2mim["prediction"], simmim_panels["prediction"])


# ------------------------------------------------------------------------------- errors


def test_wrong_or_missing_folders_exit_2_naming_the_problem(fmnist, runs, tmp_path, capsys):
    out = tmp_path / "out"
    sets = [f"data.root={fmnist}", "track=false"]
    cases = [
        ("figure1", {"A2MIM": runs["a2mim_resnet18"]}, "is a pretrain run; figure1 takes"),
        ("figure1", {"A2MIM": runs["a2mim_resnet18"]}, "fine-tune it first: a2mim finetune"),
        ("figure1", {"A2MIM": tmp_path / "nope"}, "no such run folder"),
        ("figure5", {"A2MIM": runs["finetune"]}, "is a finetune run; figure5 takes"),
        ("figure5", {"A2MIM": "random"}, "figure5 needs a trained decoder"),
        ("figure3", {"r": "random"}, "pass at least one run folder"),
        ("figure3", {"A,2": runs["finetune"]}, "model label 'A,2': use printable text without"),
        ("figure3", {"A/2": runs["finetune"], "A_2": "random"}, "the same key as 'A/2'"),
    ]
    for figure, models, message in cases:
        assert _analyze(figure, out, models, *sets) == 2, message
        err = capsys.readouterr().err
        assert "a2mim analyze: error: " in err and message in err, err

    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["finetune"], unfinished)
    (unfinished / "model.pt").unlink()
    assert _analyze("figure1", out, {"A2MIM": unfinished}, *sets) == 2
    assert "has not finished" in capsys.readouterr().err

    too_many = [*sets, "occlusion.num_images=41"]
    assert _analyze("figure1", out, {"A2MIM": runs["finetune"]}, *too_many) == 2
    assert "occlusion.num_images = 41, but the split holds only 40" in capsys.readouterr().err
    argv = ["analyze", "figure1", "--config", "tiny", "--out", str(out)]
    twice = [*argv, "--model", f"A={runs['finetune']}", "--model", f"A={runs['finetune']}"]
    assert main(twice) == 2
    assert "label 'A' is given twice" in capsys.readouterr().err
    assert not (out / "metrics.json").exists()


def test_config_errors_name_the_key():
    base = {
        "figure": "figure1",
        "models": [{"label": "A", "path": "random"}, {"label": "B", "path": "x"}],
    }
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['occlusoin'\].*'occlusion'"):
        analyze.load_config({**base, "occlusoin": {}})
    with pytest.raises(ConfigError, match="interactions: n_pairs=5000: a 8x8 grid has"):
        analyze.load_config({**base, "interactions": {"grid": 8, "n_pairs": 5000}})
    with pytest.raises(ConfigError, match="no figure"):
        analyze.load_config({"models": [{"label": "A", "path": "x"}]})
    with pytest.raises(ConfigError, match=r"models\[0\]: missing required key 'path'"):
        analyze.load_config({**base, "models": [{"label": "A"}]})
    assert analyze.metric_key("+ L_freq") == "_ L_freq"
    assert analyze.metric_key("..x/y") == "_.x_y"
    with pytest.raises(ConfigError, match=r"bands\.mid"):
        analyze.load_config({**base, "interactions": {"bands": {"mid": [0.7, 0.3]}}})
    assert analyze.pick_indices(40, 3, "n") == [0, 13, 26]
    assert analyze.pick_indices(5, None, "n") == [0, 1, 2, 3, 4]

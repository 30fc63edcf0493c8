"""Tests of a2mim.tables against a real MLflow sqlite store filled through a2mim.tracking.Tracker.

One store per module (creating it costs ~10 s). Experiment ``toy`` (scale tiny) holds the runs
the tables read: metric histories whose last value is not their largest, an older duplicate of a
cell, a RUNNING and a FAILED run that must be ignored, detection runs with a backend and the
Table 5 ablation rows; other experiments hold one problem each.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from a2mim import predictions, statistics, tables, tracking
from a2mim.cli import main

T1 = "table1_resnet50_in1k"
T3 = "table3_resnet50_transfer"
T5 = "table5_ablation_in100"
ABLATION = ("L_spa", "+ L_freq w/o omega", "+ L_freq", "+ L_freq + T(l*)")


@dataclass(frozen=True)
class Store:
    folder: Path
    uri: str
    ids: dict[str, str]  # run name -> MLflow run id


def _run(
    folder: Path, uri: str, name: str, stage: str, tags: dict, history, status="FINISHED",
    preds: dict | None = None,
):  # fmt: skip
    """One MLflow run made as a stage makes it; ``history``: metric dicts at steps 1, 2, ...;
    ``status`` None leaves the run RUNNING (an unfinished stage); ``preds``: file name ->
    predictions logged as artifacts under ``predictions/``, as the stages log them."""
    tracker = tracking.Tracker(folder / "runs" / name, stage, tags, {"name": name}, uri=uri)
    for step, metrics in enumerate(history, start=1):
        tracker.log_metrics(metrics, step * 10)
    for file_name, found in (preds or {}).items():
        path = predictions.write(predictions.path_of(folder / "runs" / name, file_name), found)
        tracker.log_artifact(path, predictions.FOLDER)
    if status is None:
        tracker.flush()
    else:
        tracker.close(status)
    return tracker.run_id


def _toy(method: str, cells: str = "", epochs: str | None = "3", **extra) -> dict:
    tags = {"experiment": "toy", "scale": "tiny", "backbone": "resnet18", "method": method}
    if cells:
        tags["cells"] = cells
    if epochs is not None:
        tags["pretrain_epochs"] = epochs
    return tags | extra


N_VAL = 500  # validation samples of the toy predictions
LABELS = np.arange(N_VAL) % 10
DIFFICULTY = np.random.default_rng(0).random(N_VAL)  # shared by every run: paired predictions


def _top1_preds(top1: float, seed: int, noise: float = 0.3) -> predictions.Predictions:
    """Predictions on the shared validation set with exactly ``top1`` percent right: the
    samples easiest for this run (shared difficulty + its own noise), as real runs correlate."""
    score = DIFFICULTY + noise * np.random.default_rng(seed + 1).random(N_VAL)
    correct = np.zeros(N_VAL, dtype=bool)
    correct[np.argsort(score)[: round(top1 * N_VAL / 100)]] = True
    pred = np.where(correct, LABELS, (LABELS + 1) % 10)
    return predictions.classification(
        [f"c{i % 10}/{i:04d}.png" for i in range(N_VAL)], LABELS, pred
    )


@pytest.fixture(autouse=True)
def _no_uri_env(monkeypatch):
    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    monkeypatch.delenv(tracking.ENV_MLFLOW_URI, raising=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    folder = tmp_path_factory.mktemp("tables")
    uri = tracking.ensure_store(folder)
    ids: dict[str, str] = {}

    def run(name, stage, tags, history, status="FINISHED", preds=None):
        ids[name] = _run(folder, uri, name, stage, tags, history, status, preds)

    run("pretrain", "pretrain", _toy("a2mim"), [{"loss": 1.0}, {"loss": 0.5}])
    run("ft_a2mim", "finetune", _toy("a2mim", f"{T1}/A2MIM/fast_ft_a3"), [
        {"top1": 50.0}, {"top1": 75.0}, {"top1": 72.5}
    ])  # fmt: skip
    run("ft_simmim_old", "finetune", _toy("simmim", f"{T1}/SimMIM/fast_ft_a3"), [{"top1": 99.0}])
    run("ft_simmim", "finetune", _toy("simmim", f"{T1}/SimMIM/fast_ft_a3"), [
        {"top1": 60.0}, {"top1": 70.0}
    ])  # fmt: skip
    run("ft_scratch", "finetune", _toy("scratch", f"{T1}/PyTorch (Sup.)/fast_ft_a3", None), [
        {"top1": 74.0}
    ])  # fmt: skip
    run("lin_a2mim", "linprobe", _toy("a2mim", f"{T1}/A2MIM/fast_lin"), [{"top1": 56.4}])
    run("lin_simmim", "linprobe", _toy("simmim", f"{T1}/SimMIM/fast_lin"), [{"top1": 56.6}])
    run("lin_running", "linprobe", _toy("a2mim", f"{T1}/A2MIM/fast_lin"), [{"top1": 99.9}], None)
    run("lin_failed", "linprobe", _toy("a2mim", f"{T1}/A2MIM/fast_lin"), [{"top1": 98.0}], "FAILED")
    for method, row, box, mask in (("a2mim", "A2MIM", 12.0, 10.0), ("scratch", "PyTorch (Sup.)", 8.0, 11.0)):  # fmt: skip
        cells = f"{T3}/{row}/coco_ap_box,{T3}/{row}/coco_ap_mask"
        run(f"det_{method}", "detect", _toy(method, cells, backend="torchvision"), [
            {"ap_box": 1.0, "ap_mask": 1.0}, {"ap_box": box, "ap_mask": mask}
        ])  # fmt: skip
    for i, row in enumerate(ABLATION):
        run(f"abl_{i}", "finetune", _toy("a2mim", f"{T5}/{row}/resnet50"), [{"top1": 80.0 + i}])
    run("abl_vit", "finetune", _toy("simmim", f"{T5}/L_spa/vit_s"), [{"top1": 70.0}])

    paper_tags = {
        "experiment": "full", "scale": "paper", "backbone": "vit_small_patch16_224",
        "dataset": "in1k", "paper_dataset": "imagenet-1k",
    }  # fmt: skip
    run("vit", "finetune", paper_tags | {"cells": "table2_vit_in1k/A2MIM/vit_s_ft"}, [
        {"top1": 81.0}
    ])  # fmt: skip
    run("mix_tiny", "pretrain", {"experiment": "mixed", "scale": "tiny"}, [{"loss": 1.0}])
    run("mix_small", "pretrain", {"experiment": "mixed", "scale": "small"}, [{"loss": 1.0}])
    run("bad", "finetune", _toy("a2mim", f"{T1}/A2MIM/nope") | {"experiment": "bad"}, [
        {"top1": 1.0}
    ])  # fmt: skip
    run("only_running", "finetune", _toy("a2mim") | {"experiment": "busy"}, [{"top1": 1.0}], None)

    # The issue's two machines: one toy DAG, A2MIM / SimMIM linear probe 58.2 / 55.2 on one and
    # 55.0 / 58.0 on the other, each with its per-sample predictions (500 validation images).
    for machine, a2mim, simmim in (("machine1", 58.2, 55.2), ("machine2", 55.0, 58.0)):
        for method, row, top1 in (("a2mim", "A2MIM", a2mim), ("simmim", "SimMIM", simmim)):
            tags = _toy(method, f"{T1}/{row}/fast_lin") | {"experiment": machine}
            preds = {"final": _top1_preds(top1, seed=len(row) + int(machine[-1]), noise=1.0)}
            run(f"{machine}_{method}", "linprobe", tags, [{"top1": top1}], preds=preds)
    # A difference far outside the noise: A2MIM 75 vs SimMIM 55 (holds) in the probe, and
    # 50 vs 70 fine-tuned (fails), one seed each, with predictions.
    for method, row, lin, ft in (("a2mim", "A2MIM", 75.0, 50.0), ("simmim", "SimMIM", 55.0, 70.0)):
        tags = _toy(method, f"{T1}/{row}/fast_lin") | {"experiment": "clear"}
        run(f"clear_lin_{method}", "linprobe", tags, [{"top1": lin}],
            preds={"final": _top1_preds(lin, seed=len(row))})  # fmt: skip
        tags = _toy(method, f"{T1}/{row}/fast_ft_a3") | {"experiment": "clear"}
        history = [{"top1": ft - 1.0, "top1_final": ft - 1.0, "top1_best_last10": ft}]
        run(f"clear_ft_{method}", "finetune", tags, history,
            preds={"best_last10": _top1_preds(ft, seed=len(row) + 5),
                   "final": _top1_preds(ft - 1.0, seed=len(row) + 5)})  # fmt: skip
    # Seeds: three fine-tuning seeds per method (best-of-last-10 rule), an older duplicate of
    # seed 1, and runs that fill no paper cell (the experiment table lists them).
    for method, row, best in (("a2mim", "A2MIM", (80.0, 81.0, 82.0)), ("simmim", "SimMIM", (70.0, 70.5, 71.5))):  # fmt: skip
        for seed, value in enumerate(best):
            tags = _toy(method, f"{T1}/{row}/fast_ft_a3") | {
                "experiment": "seeds",
                "seed": str(seed),
            }
            tags |= {"dataset": "fmnist", "run_name": f"finetune/{method}.seed{seed}"}
            if seed == 1:
                run(
                    f"seeds_{method}_old",
                    "finetune",
                    tags,
                    [{"top1": 1.0, "top1_best_last10": 1.0}],
                )
            history = [{"top1": value - 0.5, "top1_final": value - 0.5, "top1_best_last10": value}]
            run(f"seeds_{method}_{seed}", "finetune", tags, history)
    baseline = {"experiment": "seeds", "scale": "tiny", "stage": "linprobe", "method": "mine",
                "backbone": "resnet18", "dataset": "fmnist", "run_name": "linprobe/my_baseline",
                "pretrain_run": "a2mim_r18"}  # fmt: skip
    run("seeds_baseline", "linprobe", baseline, [{"top1": 33.3, "top5": 80.0}])
    return Store(folder, uri, ids)


@pytest.fixture(scope="module")
def toy_out(store) -> Path:
    """``a2mim tables`` for the toy experiment, once for the module."""
    out = store.folder / "tables_toy"
    assert (
        main(["tables", "--experiment", "toy", "--out", str(out), "--tracking-uri", store.uri]) == 0
    )
    return out


def _csv(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path, newline="") as handle:
        return {(r["row"], r["column"]): r for r in csv.DictReader(handle)}


def _claims(out: Path) -> dict[tuple[str, str, str], dict]:
    record = json.loads((out / "audit.json").read_text())
    return {(c["short"], c["column"], c["claim"]): c for c in record["claims"]}


# -- the paper's tables ------------------------------------------------------------------------


def test_packaged_paper_tables_and_their_metrics():
    paper = tables.load_paper_tables()
    assert [t.short for t in paper.values()] == ["table1", "table2", "table3", "table4", "table5"]
    assert paper[T5].rows["+ L_freq w/o omega"] == (88.47, 86.05)
    metrics = {c: tables.column_metric(c) for t in paper.values() for c in t.columns}
    assert metrics == {
        "fast_epochs": None, "long_epochs": None, "vit_s_epochs": None, "vit_b_epochs": None,
        "epochs": None, "fast_lin": "top1", "fast_ft_a3": "top1", "long_ft_a3": "top1",
        "long_ft_a2": "top1", "vit_s_ft": "top1", "vit_b_ft": "top1", "coco_ap_box": "ap_box",
        "coco_ap_mask": "ap_mask", "ade20k_miou": "miou", "resnet50": "top1", "vit_s": "top1",
    }  # fmt: skip
    assert tables.epochs_scope(paper[T1], "fast_epochs") == ("fast_lin", "fast_ft_a3")
    assert tables.epochs_scope(paper[T3], "epochs") == (
        "coco_ap_box",
        "coco_ap_mask",
        "ade20k_miou",
    )
    with pytest.raises(tables.TablesError, match="no known metric"):
        tables.column_metric("imagenet_top5")


def test_cell_names_parse_with_slashes_in_rows_and_are_checked():
    paper = tables.load_paper_tables()
    assert tables.parse_cell(f"{T5}/+ L_freq w/o omega/vit_s", paper, "r") == (
        T5, "+ L_freq w/o omega", "vit_s"
    )  # fmt: skip
    with pytest.raises(tables.TablesError, match=r"run r1: .*has rows"):
        tables.parse_cell(f"{T1}/MAE/fast_lin", paper, "r1")
    with pytest.raises(tables.TablesError, match="table key"):
        tables.parse_cell("table9/A2MIM/x", paper, "r1")
    with pytest.raises(tables.TablesError, match="pretrain_epochs tag"):
        tables.parse_cell(f"{T1}/A2MIM/fast_epochs", paper, "r1")


def test_claim_verdicts_follow_the_confidence_intervals():
    def ci(low, high):
        return statistics.DifferenceCI(1.0, low, high, 1, 1, 500, ("samples",))

    def claim(ours, *cis):
        rows = ("A", "B", "C")[: len(ours)]
        paper = (3.0, 2.0, 1.0)[: len(ours)]
        return tables.Claim(T5, "resnet50", rows, paper, ours, (("a",),) * len(ours), cis)

    assert claim((2.0, 1.0), ci(0.5, 1.5)).verdict == "holds"
    assert claim((1.0, 2.0), ci(-1.5, -0.5)).verdict == "fails"
    assert claim((2.0, 1.0), ci(-0.5, 2.5)).verdict == "inconclusive"  # ordered, within noise
    assert claim((2.0, 1.0), ci(None, None)).verdict == "inconclusive"  # no CI: cannot tell
    assert claim((2.0, 1.0)).verdict == "inconclusive"
    assert claim((1.0, None)).verdict == "not run"
    # a ranking of three rows: every adjacent pair must hold; one pair below zero fails it
    assert claim((3.0, 2.0, 1.0), ci(0.1, 2.0), ci(0.2, 1.0)).verdict == "holds"
    assert claim((3.0, 2.0, 1.0), ci(0.1, 2.0), ci(-1.0, 1.0)).verdict == "inconclusive"
    assert claim((3.0, 2.0, 1.0), ci(-0.5, 2.0), ci(-2.0, -1.0)).verdict == "fails"


# -- the tables from MLflow --------------------------------------------------------------------


def test_table1_numbers_deltas_and_newest_run(store, toy_out):
    rows = _csv(toy_out / "table1.csv")
    paper = tables.load_paper_tables()[T1]
    assert len(rows) == len(paper.rows) * len(paper.columns)  # every paper cell, run or not
    a2mim_ft = rows[("A2MIM", "fast_ft_a3")]
    assert (a2mim_ft["paper"], a2mim_ft["ours"], a2mim_ft["scale"]) == ("78.8", "72.5", "tiny")
    assert a2mim_ft["delta"] == ""  # toy data, not ImageNet-1K: no delta to the paper
    assert (a2mim_ft["rule"], a2mim_ft["n_seeds"], a2mim_ft["std"]) == ("final", "1", "")
    assert a2mim_ft["run_id"] == store.ids["ft_a2mim"]
    simmim_ft = rows[("SimMIM", "fast_ft_a3")]  # the newer duplicate wins over 99.0
    assert (simmim_ft["ours"], simmim_ft["run_id"]) == ("70.0", store.ids["ft_simmim"])
    lin = rows[("A2MIM", "fast_lin")]  # the RUNNING (99.9) and FAILED (98.0) runs are ignored
    assert (lin["ours"], lin["run_id"]) == ("56.4", store.ids["lin_a2mim"])
    epochs = rows[("A2MIM", "fast_epochs")]  # pretrain_epochs of the fast_* runs
    assert (epochs["ours"], epochs["delta"]) == ("3.0", "-97.0")
    assert set(epochs["run_id"].split(";")) == {store.ids["ft_a2mim"], store.ids["lin_a2mim"]}
    assert rows[("PyTorch (Sup.)", "fast_epochs")]["ours"] == ""  # scratch: no pre-training
    assert rows[("PyTorch (Sup.)", "fast_ft_a3")]["ours"] == "74.0"
    not_run = rows[("MoCoV2", "long_ft_a2")]
    assert (not_run["paper"], not_run["ours"], not_run["delta"], not_run["scale"]) == (
        "79.8", "", "", ""
    )  # fmt: skip
    assert rows[("CIM", "fast_lin")]["paper"] == ""


def test_markdown_layout_toy_label_and_footnotes(store, toy_out):
    md = (toy_out / "table1.md").read_text()
    assert md.startswith("## Table 1: ImageNet-1K linear probing")
    assert "| A2MIM " in md and "78.8 / 72.5 " in md and "48.1 / 56.4 " in md
    assert "(-6.3)" not in md and "(+8.3)" not in md  # no delta: the runs are not on ImageNet-1K
    assert "No delta to the paper in 5 cell(s)" in md and "ImageNet-1K" in md
    assert "Dataset(s) used (tag `dataset`): unknown · the paper's: ImageNet-1K" in md
    assert "logged no top1_best_last10; its final top-1 is used" in md
    assert "100 / 3 (-97)" in md
    assert "**Toy scale (tiny): these numbers are NOT comparable to the paper's.**" in md
    assert "resnet18" in md and "`toy`" in md and store.uri in md
    assert (
        f"the newest of each seed, {store.ids['ft_simmim']}, is used (older: "
        f"{store.ids['ft_simmim_old']})" in md
    )
    table_lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len({len(line) for line in table_lines}) == 1  # padded: columns line up in a terminal
    assert len(table_lines) == 2 + 13


def test_detection_tables_name_their_backend(toy_out):
    assert "Detection backend(s): torchvision" in (toy_out / "table3.md").read_text()
    assert "Detection backend(s): none (no COCO run)" in (toy_out / "table4.md").read_text()
    assert "Detection backend" not in (toy_out / "table1.md").read_text()
    rows = _csv(toy_out / "table3.csv")
    assert rows[("A2MIM", "coco_ap_box")]["ours"] == "12.0"
    assert rows[("A2MIM", "coco_ap_mask")]["ours"] == "10.0"
    assert rows[("A2MIM", "epochs")]["ours"] == "3.0"


def test_latex_is_a_booktabs_tabular(toy_out):
    tex = (toy_out / "table5.tex").read_text()
    assert r"\begin{tabular}{lrrrrrr}" in tex
    for rule in (r"\toprule", r"\cmidrule(lr){2-4}", r"\midrule", r"\bottomrule"):
        assert rule in tex
    assert r"+ L\_freq w/o omega & 88.47 & 81.00 &  & 86.05 &  &  \\" in tex
    tabular, notes = tex.split(r"\end{tabular}")
    assert r"\textbf{Toy scale (tiny): these numbers are NOT comparable" in notes
    assert "pretrain\\_epochs" in notes and "`" not in notes
    assert tabular.count("{") == tabular.count("}") and notes.count("{") == notes.count("}")


def test_audit_without_seeds_or_predictions_cannot_tell(toy_out):
    """One seed per row and no per-sample predictions: no CI, so every claim that ran is
    inconclusive, whatever the order of the numbers."""
    claims = _claims(toy_out)
    lin = claims[("table1", "fast_lin", "A2MIM > SimMIM")]
    assert (lin["verdict"], lin["paper"], lin["ours"]) == (
        "inconclusive",
        [48.1, 47.5],
        [56.4, 56.6],
    )
    assert lin["cis"][0]["low"] is None and "no uncertainty estimate" in lin["cis"][0]["note"]
    assert "no per-sample predictions for run(s)" in lin["cis"][0]["note"]
    assert claims[("table1", "fast_ft_a3", "A2MIM > SimMIM")]["verdict"] == "inconclusive"
    assert ("table1", "fast_lin", "A2MIM > PyTorch (Sup.)") not in claims  # the paper: Sup. ahead
    assert ("table1", "fast_ft_a3", "A2MIM > PyTorch (Sup.)") not in claims  # a tie: no claim
    assert claims[("table1", "long_ft_a2", "A2MIM > PyTorch (Sup.)")]["verdict"] == "not run"
    assert claims[("table3", "coco_ap_box", "A2MIM > PyTorch (Sup.)")]["verdict"] == "inconclusive"
    mask = claims[("table3", "coco_ap_mask", "A2MIM > PyTorch (Sup.)")]
    assert (mask["verdict"], mask["ours"]) == ("inconclusive", [10.0, 11.0])
    ranking = " > ".join(reversed(ABLATION))
    assert claims[("table5", "resnet50", ranking)]["verdict"] == "inconclusive"
    assert len(claims[("table5", "resnet50", ranking)]["cis"]) == 3  # one per adjacent pair
    vit = claims[("table5", "vit_s", ranking)]
    assert (vit["verdict"], vit["ours"]) == ("not run", [None, None, None, 70.0])
    assert all(c["verdict"] == "not run" for k, c in claims.items() if k[0] in ("table2", "table4"))
    record = json.loads((toy_out / "audit.json").read_text())
    assert record["counts"] == {
        "holds": 0, "fails": 0, "inconclusive": 5, "not run": len(claims) - 5
    }  # fmt: skip
    assert (record["scale"], record["comparable_to_paper"]) == ("tiny", False)
    md = (toy_out / "audit.md").read_text()
    row = (
        r"\| table1 \| fast_lin +\| A2MIM > SimMIM +\| 48\.1 > 47\.5 +\| 56\.4 vs 56\.6 +"
        r"\| -0\.2 \[no CI\] +\| 1 vs 1 +\| – +\| inconclusive"
    )
    assert re.search(row, md), md
    assert "NOT comparable" in md and "inconclusive: 5" in md


def _audit(store, experiment, tmp_path) -> tuple[dict, str]:
    out = tmp_path / experiment
    argv = ["tables", "--experiment", experiment, "--out", str(out), "--tracking-uri", store.uri]
    assert main([*argv, "--audit-only"]) == 0
    return _claims(out), (out / "audit.md").read_text()


def test_the_issues_two_machines_are_both_inconclusive(store, tmp_path):
    """58.2 / 55.2 on one machine, 55.0 / 58.0 on the other: the old audit said "holds" on one
    and "fails" on the other; a 3-point difference on 500 images is inside the paired
    bootstrap's 95 % CI, so both say inconclusive and print the CI."""
    for machine, diff in (("machine1", 3.0), ("machine2", -3.0)):
        claims, md = _audit(store, machine, tmp_path)
        claim = claims[("table1", "fast_lin", "A2MIM > SimMIM")]
        ci = claim["cis"][0]
        assert claim["verdict"] == "inconclusive", ci
        assert ci["diff"] == pytest.approx(diff) and ci["low"] < 0 < ci["high"]
        assert ci["sources"] == ["samples"] and ci["n_samples"] == N_VAL
        assert ci["n_seeds"] == [1, 1]
        text = f"{diff:+.1f} [{ci['low']:+.1f}, {ci['high']:+.1f}]"
        assert text in md and "| 1 vs 1 " in md and f"| {N_VAL} " in md
        # McNemar's exact test on the same predictions agrees: no significant difference
        folder = store.folder / "runs"
        a = predictions.read(folder / f"{machine}_a2mim/predictions/final.npz")
        b = predictions.read(folder / f"{machine}_simmim/predictions/final.npz")
        test = statistics.mcnemar_exact(a.correct, b.correct)
        assert test.p_value > 0.05
        assert f"McNemar exact p = {test.p_value:.3g} (A2MIM alone right on {test.a_only}" in md
        # two encoders' probes at ~57 % disagree on about a third of the images
        assert 0.25 < np.mean(a.correct != b.correct) < 0.4


def test_differences_outside_the_noise_hold_or_fail(store, tmp_path):
    claims, md = _audit(store, "clear", tmp_path)
    lin = claims[("table1", "fast_lin", "A2MIM > SimMIM")]
    assert lin["verdict"] == "holds" and lin["cis"][0]["low"] > 0
    ft = claims[("table1", "fast_ft_a3", "A2MIM > SimMIM")]  # best of last 10: 50 vs 70
    assert ft["verdict"] == "fails" and ft["ours"] == [50.0, 70.0] and ft["cis"][0]["high"] < 0
    assert ft["cis"][0]["diff"] == pytest.approx(-20.0)  # from the best_last10 predictions
    assert "holds: 1 · fails: 1" in md.lower()


def test_seeds_give_mean_std_and_a_seed_ci(store, tmp_path):
    out = tmp_path / "seeds"
    argv = ["tables", "--experiment", "seeds", "--out", str(out), "--tracking-uri", store.uri]
    assert main(argv) == 0
    rows = _csv(out / "table1.csv")
    cell = rows[("A2MIM", "fast_ft_a3")]
    assert float(cell["ours"]) == pytest.approx(81.0) and float(cell["std"]) == pytest.approx(1.0)
    assert (cell["n_seeds"], cell["seeds"], cell["rule"]) == (
        "3",
        "0;1;2",
        "best of last 10 epochs",
    )
    assert cell["dataset"] == "fmnist" and cell["delta"] == ""
    assert store.ids["seeds_a2mim_old"] not in cell["run_id"]  # seed 1's newer run wins
    md = (out / "table1.md").read_text()
    assert "78.8 / 81.0 ± 1.0 (n=3)" in md
    assert "fast_ft_a3: best of last 10 epochs" in md
    tex = (out / "table1.tex").read_text()
    assert r"81.0 $\pm$ 1.0 (n=3)" in tex
    claim = _claims(out)[("table1", "fast_ft_a3", "A2MIM > SimMIM")]
    ci = claim["cis"][0]
    a, b = [80.0, 81.0, 82.0], [70.0, 70.5, 71.5]
    welch = statistics.difference_ci(a, b)
    assert ci["sources"] == ["seeds"] and (ci["low"], ci["high"]) == pytest.approx(
        (welch.low, welch.high)
    )
    assert claim["verdict"] == "holds" and claim["seeds"] == [3, 3]
    assert "81.0 ± 1.0 vs 70.7 ± 0.8" in (out / "audit.md").read_text()


def test_experiment_table_lists_every_run_with_its_metrics(store, tmp_path):
    out = tmp_path / "exp"
    argv = ["tables", "--experiment", "seeds", "--out", str(out), "--tracking-uri", store.uri]
    assert main([*argv, "--audit-only"]) == 0
    with open(out / "experiment.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9  # 2 methods x (3 seeds + an older duplicate of seed 1), the baseline
    baseline = next(r for r in rows if r["run"] == "linprobe/my_baseline")
    assert (baseline["stage"], baseline["dataset"], baseline["init"]) == (
        "linprobe",
        "fmnist",
        "a2mim_r18",
    )
    assert float(baseline["top5"]) == 80.0 and baseline["top1_best_last10"] == ""
    seeded = [r for r in rows if r["run"] == "finetune/a2mim.seed2"]
    assert seeded[0]["seed"] == "2" and float(seeded[0]["top1_best_last10"]) == 82.0
    md = (out / "experiment.md").read_text()
    assert "linprobe/my_baseline" in md and "top5=80" in md and "9 FINISHED runs" in md


def test_paper_scale_has_no_toy_label_and_table_option_restricts(store, tmp_path):
    out = tmp_path / "full"
    argv = ["tables", "--experiment", "full", "--out", str(out), "--tracking-uri", store.uri]
    assert main([*argv, "--table", "table2", "table4_vitb_transfer"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "table2.csv", "table2.md", "table2.tex", "table4.csv", "table4.md", "table4.tex"
    ]  # fmt: skip
    md = (out / "table2.md").read_text()
    assert "82.2 / 81.0 (-1.2)" in md and "scale `paper`" in md
    assert "NOT comparable" not in md
    assert main([*argv, "--audit-only", "--table", "table2"]) == 0
    record = json.loads((out / "audit.json").read_text())
    assert record["tables"] == ["table2"] and record["comparable_to_paper"] is True


@pytest.mark.parametrize(
    ("experiment", "message"),
    [
        ("nothing", r"no run with tag experiment='nothing' .*at sqlite:///.*snakemake"),
        ("busy", r"1 runs but none FINISHED \(1 RUNNING\)"),
        ("mixed", r"mix scales: small \(e\.g\. run \w+\), tiny"),
        ("bad", r"cell 'table1_resnet50_in1k/A2MIM/nope'.*fix the workflow's cells tag"),
    ],
)
def test_errors_exit_non_zero_and_write_nothing(store, tmp_path, capsys, experiment, message):
    out = tmp_path / "out"
    argv = ["tables", "--experiment", experiment, "--out", str(out), "--tracking-uri", store.uri]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("a2mim tables: error: ")
    assert re.search(message, err), err
    assert not out.exists()


def test_missing_store_and_unknown_table_are_named(store, tmp_path, capsys):
    missing = tmp_path / "results"
    assert (
        main(
            [
                "tables",
                "--experiment",
                "toy",
                "--out",
                str(tmp_path / "o"),
                "--results",
                str(missing),
            ]
        )
        == 2
    )
    assert f"no MLflow store at {missing.resolve()}" in capsys.readouterr().err
    argv = [
        "tables",
        "--experiment",
        "toy",
        "--out",
        str(tmp_path / "o"),
        "--tracking-uri",
        store.uri,
    ]
    assert main([*argv, "--table", "table7"]) == 2
    assert (
        "unknown table(s) ['table7']; choose from table1 (table1_resnet50_in1k)"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "o").exists()

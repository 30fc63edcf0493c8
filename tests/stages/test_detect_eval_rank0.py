"""COCO evaluation of a detector under two gloo processes: each rank predicts its shard, rank 0
alone runs COCOeval on the gathered detections, and both ranks return its metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

WORKER = """
import json, pathlib, sys, torch
from a2mim.data.coco import CocoInstances
from a2mim.detection import evaluate as detect
from a2mim.train import distributed as d

root, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
rank, world = d.init_distributed("cpu")
val = CocoInstances(root / "coco/annotations/instances_val2017.json", root / "coco/val2017")
truth = [val[i] for i in range(len(val))]


class Oracle(torch.nn.Module):
    def forward(self, images):
        preds = []
        for img in images:
            _, target = next(t for t in truth if torch.equal(t[0], img))
            n = len(target["labels"])
            preds.append({"boxes": target["boxes"], "scores": torch.linspace(1.0, 0.5, n),
                          "labels": target["labels"], "masks": target["masks"].bool()})
        return preds


calls = []
real = detect.coco_evaluate
detect.coco_evaluate = lambda gt, results, **kw: calls.append(len(results)) or real(gt, results, **kw)
metrics = detect.evaluate_detector(Oracle(), val, torch.device("cpu"), batch_size=2)
(out / f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, "coco_calls": calls,
                                                  "annotations": len(val.coco.anns)}))
d.teardown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cocoeval_runs_on_rank_zero_only(tmp_path: Path) -> None:
    from a2mim.data.scenes import make_scenes

    root = tmp_path / "scenes"
    make_scenes(root, n_train=4, n_val=6, img_size=64, scale=(1.0, 1.6))
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_free_port()), str(script), str(root), str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["coco_calls"] == [r0["annotations"]]  # rank 0: once, on every detection
    assert r1["coco_calls"] == []  # rank 1 never runs COCOeval
    assert r0["metrics"] == r1["metrics"]
    assert r0["metrics"]["ap_mask"] == 100.0 and r0["metrics"]["detections"] == r0["annotations"]

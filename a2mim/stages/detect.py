"""Stage ``detect``: COCO instance detection and segmentation with Mask R-CNN (paper Sec. 5.2).

``run(cfg, out_dir) -> metrics``. A Mask R-CNN on a timm encoder (``model``: a
`a2mim.detection.DetectorSpec`; ``c4`` for the paper's ResNet-50-C4 2x, ``sfp`` for its ViT-B
with a simple feature pyramid 1x, ``fpn`` for hierarchical encoders) is initialised from a
pretrain ``encoder.pt`` (``init``, loaded strictly; without it the encoder trains from scratch)
and fine-tuned end to end on a COCO-format instance set, then evaluated with pycocotools'
COCOeval: box and mask AP, AP50 and AP75 in percent.

``backend`` picks the library that builds the network: ``torchvision``, ``detectron2`` (the
paper's; built from upstream source, see `a2mim.detection.DETECTRON2_INSTALL`) or ``auto``
(detectron2 when importable, else torchvision; the choice is logged). Asking for detectron2
without it installed stops with the install instructions. The backend used is the MLflow tag
``backend``, ``derived.backend`` in ``resolved_config.yaml`` and ``backend`` in ``metrics.json``;
the config hash covers the resolved backend, so a run never resumes under the other library.

Training follows detectron2's solver (`a2mim.detection.solver`). Images without (non-crowd)
annotations are left out of training, crowd regions are dropped from the training targets;
augmentation is the horizontal flip (drawn from ``(seed, epoch, index)``) and the multi-scale
resize inside the detector (seeded from ``(seed, step)`` before each step, which also fixes the
RPN and RoI sampling). Restarting the same command resumes from ``checkpoint.pt`` (model,
optimizer, grad scaler, step) and, on the CPU in deterministic mode, ends with the weights of an
uninterrupted run.

Data: ``data.root`` is a COCO 2017 folder (``annotations/instances_{train,val}2017.json``,
``train2017/``, ``val2017/``; `a2mim.data.coco.validate_root` checks it before anything is
built). Training boxes are clipped to the image and empty ones dropped, as detectron2's loader
does; ``derived.empty_boxes`` counts them. ``sync_bn`` synchronises BatchNorm across CUDA
processes; on the CPU (gloo cannot) each process keeps plain BatchNorm, with a warning
(``derived.norm``). ``precise_bn_iters`` > 0 recomputes BatchNorm statistics before each
evaluation over that many training batches, at most one per step done (MoCo's
``TEST.PRECISE_BN``, 200). Evaluation runs in float32 whatever ``amp`` is.
``deterministic`` null (default) means deterministic kernels on the CPU and fast ones on CUDA
(torchvision's deterministic RoIAlign fallback is slow there); ``derived.deterministic``
records the choice.

The run directory holds ``resolved_config.yaml`` (``derived``: backend, lr, steps, classes, the
init report; with detectron2 its own config of the network and solver,
``derived.detectron2_config``, also written to ``detectron2_config.yaml`` at the end),
``checkpoint.pt``, ``model.pt`` (detector weights + ``meta``; `load_detector`),
``metrics.jsonl`` (train lines per logged step, eval lines) and ``metrics.json`` (written last):
``ap_box``, ``ap50_box``, ``ap75_box``, ``ap_mask``, ``ap50_mask``, ``ap75_mask``,
``final_loss`` and ``backend``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch.utils.data import DataLoader

from a2mim import atomic, predictions
from a2mim.config import (
    ConfigError,
    TransferRunConfig,
    bounded,
    check_ranges,
    from_dict,
    to_dict,
)
from a2mim.data.coco import CocoInstances, validate_root
from a2mim.detection import DetectorSpec, Input, build_detector, resolve_backend
from a2mim.detection.evaluate import evaluate_detector, load_detector
from a2mim.detection.instances import (
    DataConfig,
    FlippedInstances,
    collate,
    count_empty_training_boxes,
    hflip,
    trainable_indices,
)
from a2mim.detection.precise_bn import update_bn_stats
from a2mim.detection.solver import (
    SolverConfig,
    WarmupMultiStep,
    build_optimizer,
    lr_factor,
    param_groups,
    vit_depth_of,
)
from a2mim.detection.spec import SPEC_RANGES
from a2mim.train import checkpoint, engine
from a2mim.train.classify import tracked_derived
from a2mim.train.distributed import broadcast_buffers
from a2mim.train.encoder import check_backbone
from a2mim.train.rundir import init_tags, require_init
from a2mim.train.sampling import EpochSampler, mix_seed

__all__ = [
    "DataConfig",
    "DetectConfig",
    "FlippedInstances",
    "SolverConfig",
    "build_optimizer",
    "evaluate_detector",
    "hflip",
    "load_config",
    "load_detector",
    "lr_factor",
    "param_groups",
    "run",
]

log_ = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectConfig(TransferRunConfig):
    """A detect YAML: the ``model`` (a detector spec), ``input`` (resize), ``data`` and
    ``solver`` sections, the ``backend`` and the run-control keys of
    :class:`~a2mim.config.TransferRunConfig`, with detectron2's defaults."""

    model: DetectorSpec = field(default_factory=DetectorSpec)
    input: Input = field(default_factory=Input)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    backend: Literal["auto", "torchvision", "detectron2"] = "auto"
    batch_size: int = bounded(16, ge=1)  # images per process and micro-step
    deterministic: bool | None = None  # null: true on the CPU, false on CUDA (fast RoIAlign)
    precise_bn_iters: int = bounded(0, ge=0)  # > 0: MoCo's precise BN (200) before evaluations
    eval_every_steps: int | None = bounded(None, ge=1)  # null: evaluate at the end only
    ckpt_every_steps: int = bounded(1000, ge=1)
    log_every_steps: int = bounded(20, ge=1)


def load_config(data: dict[str, Any], where: str = "config") -> DetectConfig:
    """Validate a mapping into a ``DetectConfig`` (unknown keys and bad values are errors)."""
    cfg = from_dict(DetectConfig, data, where)
    for section, ranges in SPEC_RANGES.items():
        check_ranges(getattr(cfg, section), ranges, f"{where}.{section}")
    spec, solver = cfg.model, cfg.solver
    check_backbone(spec.backbone, where)
    if spec.arch != "c4" and len(spec.anchor_sizes) != 5:
        raise ConfigError(
            f"{where}: model.anchor_sizes needs one size per pyramid level P2-P6 (5) for arch "
            f"{spec.arch}, got {list(spec.anchor_sizes)}"
        )
    if spec.arch != "sfp" and spec.norm == "frozen_bn" and cfg.init is None:
        raise ConfigError(
            f"{where}: model.norm frozen_bn without init freezes random BatchNorm statistics "
            f"and training diverges; use norm: bn (or sync_bn) from scratch, or pass --init"
        )
    vit_only = spec.window_size is not None or spec.global_blocks or spec.rel_pos_bias
    if spec.arch != "sfp" and vit_only:
        raise ConfigError(
            f"{where}: model.window_size, global_blocks and rel_pos_bias are ViT (arch sfp) "
            f"options; remove them for arch {spec.arch}"
        )
    if spec.window_size is not None and spec.window_size < 1:
        raise ConfigError(f"{where}: model.window_size must be >= 1 or null")
    if solver.layer_decay is not None and (spec.arch != "sfp" or not 0 < solver.layer_decay <= 1):
        raise ConfigError(
            f"{where}: solver.layer_decay must be in (0, 1] and needs a ViT (arch sfp), got "
            f"{solver.layer_decay} with arch {spec.arch}"
        )
    if list(solver.steps) != sorted(set(solver.steps)) or any(s < 1 for s in solver.steps):
        raise ConfigError(f"{where}: solver.steps must increase and be >= 1, got {solver.steps}")
    return cfg


def _open_datasets(
    cfg: DetectConfig, with_polygons: bool = False
) -> tuple[CocoInstances, CocoInstances]:
    d = cfg.data
    root = Path(d.root)
    validate_root(root, d.train_ann, d.train_images, d.val_ann, d.val_images)
    train = CocoInstances(root / d.train_ann, root / d.train_images, with_polygons=with_polygons)
    val = CocoInstances(root / cfg.data.val_ann, root / cfg.data.val_images)
    if train.cat_ids != val.cat_ids:
        raise ValueError(
            f"{root}: the category ids of {cfg.data.train_ann} ({train.cat_ids}) and "
            f"{cfg.data.val_ann} ({val.cat_ids}) differ; both splits need the same categories"
        )
    return train, val


class DetectTask(engine.Task):
    """Mask R-CNN: the detector returns its losses; detectron2's solver (`WarmupMultiStep`);
    COCOeval every ``eval_every_steps`` and at the end."""

    stage = "detect"
    static_shapes = False  # images keep their aspect ratio: no cudnn.benchmark
    loss_format = ".3f"
    nonfinite_hint = (
        "lower solver.base_lr, lengthen the warm-up, or use norm: bn when training from scratch"
    )

    def prepare(self, accum_steps: int) -> engine.Steps:
        cfg = self.cfg
        self.backend = resolve_backend(cfg.backend)
        require_init(cfg.init)
        self.train_set, self.val_set = _open_datasets(cfg, self.backend == "detectron2")
        self.train_idx = trainable_indices(self.train_set, cfg.data.filter_empty)
        self.empty_boxes = count_empty_training_boxes(self.train_set, self.train_idx, self.ctx.rank)
        self.norm_world, self.norm = _norm(cfg, self.ctx)
        global_batch = cfg.batch_size * self.ctx.world * accum_steps
        what = f"{cfg.data.root}/{cfg.data.train_ann} (trainable images)"
        per_epoch = engine.epoch_steps(len(self.train_idx), global_batch, what)
        self.flipped = FlippedInstances(self.train_set, self.train_idx, cfg.data.hflip, cfg.seed)
        return engine.Steps(cfg.solver.max_iter, global_batch, accum_steps, per_epoch)

    def build(self) -> None:
        cfg, solver = self.cfg, self.cfg.solver
        self.lr = solver.scaled_lr(self.steps.global_batch)
        num_classes = len(self.train_set.cat_ids)
        model = build_detector(
            self.backend, cfg.model, cfg.input, num_classes, cfg.init, world_size=self.norm_world
        )
        self.model = model.to(self.ctx.device)
        self.optimizer = build_optimizer(self.model, solver, self.lr, vit_depth_of(self.model))
        self.scheduler = WarmupMultiStep(self.optimizer, self.lr, solver)

    def derived(self) -> dict[str, Any]:
        val_limit = self.cfg.data.val_limit
        n_val = len(self.val_set)
        return {
            "backend": self.backend,
            "epochs": self.steps.total / self.steps.per_epoch,
            "num_images": len(self.train_set),
            "num_train_images": len(self.train_idx),
            "num_val_images": n_val if val_limit is None else min(val_limit, n_val),
            "num_classes": len(self.train_set.cat_ids),
            "classes": list(self.train_set.class_names),
            "num_params": sum(p.numel() for p in self.model.parameters()),  # shared res5 once
            "init": self.model.init_report,
            "empty_boxes": self.empty_boxes,
            "norm": self.norm,
            "deterministic": _deterministic(self.cfg, self.ctx.device),
            "eval_precision": "fp32",
            **({"detectron2_config": self._d2_config()} if self.backend == "detectron2" else {}),
        }

    def _d2_config(self) -> dict[str, Any]:
        """detectron2's config of the network and the solver (`Detectron2MaskRCNN.config_yaml`)."""
        solver = solver_summary(self.cfg, self.lr, self.steps.global_batch)
        return yaml.safe_load(self.model.config_yaml(solver))

    def hashed_config(self) -> DetectConfig:
        # the hash covers the resolved backend: "auto" must not resume under another library
        return dataclasses.replace(self.cfg, backend=self.backend)

    def tags(self) -> dict[str, str]:
        return {
            **init_tags(self.cfg.model.backbone, self.model.init_report),
            "backend": self.backend,
        }

    def tracked(self, derived: dict[str, Any]) -> dict[str, Any]:
        return tracked_derived({k: v for k, v in derived.items() if k != "detectron2_config"})

    def batches(self, step: int):
        return self.epoch_batches(step, self.flipped, len(self.train_idx), collate_fn=collate)

    def step_seed(self, step: int) -> int:
        return mix_seed(self.cfg.seed, 1, step, self.ctx.rank)  # resize, RPN/RoI sampling

    def loss(self, train_model, batch, step, micro):
        device = self.ctx.device
        images, targets = batch
        images = [img.to(device, non_blocking=True) for img in images]
        targets = [{k: _to(v, device) for k, v in t.items()} for t in targets]
        with self.ctx.autocast():
            losses = train_model(images, targets)
        values = {k: float(v.detach()) for k, v in losses.items()}
        parts = {"loss": sum(values.values()), **values}
        return sum(losses.values()), {
            k: torch.tensor(v, dtype=torch.float64) for k, v in parts.items()
        }

    @property
    def grad_clip(self) -> float | None:
        return self.cfg.solver.grad_clip

    def clip_parameters(self):
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def logged_lr(self, step: int) -> float:
        return self.lr * lr_factor(step, self.cfg.solver)

    def progress(self, done: int) -> dict[str, float]:
        return {"epoch": done / self.steps.per_epoch}

    def eval_due(self, done: int) -> bool:
        every = self.cfg.eval_every_steps
        return bool(every) and done % every == 0

    def evaluate(self, done: int) -> dict[str, float]:
        cfg, evaluators = self.cfg, {}
        if cfg.precise_bn_iters and done > 0:
            self._precise_bn(done)
        broadcast_buffers(self.model)  # every rank evaluates with rank 0's BatchNorm statistics
        # float32: bf16 scores take ~20 distinct values per 100 and COCOeval ranks ties
        row = evaluate_detector(
            self.model,
            self.val_set,
            self.ctx.device,
            cfg.data.eval_batch_size,
            cfg.data.val_limit,
            evaluators=evaluators,
        )
        if done == self.steps.end and self.ctx.rank == 0 and evaluators:  # paired statistics
            found = predictions.detection_from_cocoeval(evaluators, stage="detect", step=done)
            predictions.write(predictions.path_of(self.ctx.out), found)
        return row

    def _precise_bn(self, done: int) -> None:
        """MoCo's precise BN: BatchNorm statistics recomputed over ``precise_bn_iters``
        training batches (at most ``done``; a fixed draw per evaluation step) with the current
        weights. SyncBatchNorm synchronises them across processes in the forward."""
        cfg, ctx = self.cfg, self.ctx
        seed = mix_seed(cfg.seed, 2, done)
        global_batch = cfg.batch_size * ctx.world
        usable = (len(self.flipped) // global_batch) * global_batch
        sampler = EpochSampler(
            len(self.flipped), seed, 0, rank=ctx.rank, world_size=ctx.world, usable=usable
        )
        loader = DataLoader(
            self.flipped,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=cfg.data.num_workers,
            collate_fn=collate,
            drop_last=True,
        )
        torch.manual_seed(mix_seed(seed, ctx.rank))  # resize draws, RPN / RoI sampling

        def forward(batch: tuple[list, list]) -> None:
            images, targets = batch
            images = [img.to(ctx.device) for img in images]
            targets = [{k: _to(v, ctx.device) for k, v in t.items()} for t in targets]
            with ctx.autocast():
                self.model(images, targets)

        # at most one batch per training step done: a 1-step smoke run does 1 (MoCo: 200 of 180k)
        num_iter = min(cfg.precise_bn_iters, done)
        repeats = math.ceil(num_iter / max(len(loader), 1))
        update_bn_stats(self.model, (b for _ in range(repeats) for b in loader), num_iter, forward)

    def final_metrics(self, last_eval, last_log) -> dict[str, Any]:
        metrics: dict[str, Any] = {k: v for k, v in last_eval.items() if k != "detections"}
        if last_log:
            metrics["final_loss"] = last_log["loss"]
        metrics["backend"] = self.backend
        return metrics

    def write_final(self, metrics: dict[str, Any]) -> list:
        cfg, init_report = self.cfg, self.model.init_report
        meta = {
            "stage": "detect",
            "backend": self.backend,
            "model": to_dict(cfg.model),
            "input": to_dict(cfg.input),
            "num_classes": len(self.train_set.cat_ids),
            "classes": list(self.train_set.class_names),
            "cat_ids": list(self.train_set.cat_ids),
            "init": cfg.init,
            "init_sha256": None if init_report is None else init_report["sha256"],
            "config_hash": self.config_hash,
            "steps": self.steps.total,
        }
        saved = {"state_dict": self.model.state_dict(), "meta": meta}
        checkpoint.atomic_save(saved, self.ctx.out / "model.pt")
        found = predictions.path_of(self.ctx.out)  # none when the model detected nothing
        artifacts = [(found, predictions.FOLDER)] if found.is_file() else []
        if self.backend != "detectron2":
            return artifacts
        d2_file = self.ctx.out / "detectron2_config.yaml"
        atomic.write_text(d2_file, yaml.safe_dump(self._d2_config(), sort_keys=True))
        return [*artifacts, (d2_file, None)]


def solver_summary(cfg: DetectConfig, lr: float, ims_per_batch: int) -> dict[str, Any]:
    """The solver as `Detectron2MaskRCNN.config_yaml` records it (``lr``: the scaled lr for
    ``ims_per_batch`` images per optimizer step)."""
    return {
        **to_dict(cfg.solver),
        "lr": lr,
        "ims_per_batch": ims_per_batch,
        "amp": cfg.amp,
        "precise_bn_iters": cfg.precise_bn_iters,
    }


def _deterministic(cfg: DetectConfig, device: torch.device) -> bool:
    """``deterministic`` null: deterministic kernels on the CPU, fast ones on CUDA."""
    return device.type == "cpu" if cfg.deterministic is None else cfg.deterministic


def _norm(cfg: DetectConfig, ctx: engine.Context) -> tuple[int, str]:
    """``(processes BatchNorm synchronises over, the normalisation as built)``: SyncBatchNorm
    needs CUDA, so CPU processes keep plain BatchNorm (a warning says so)."""
    norm_world = ctx.world if ctx.device.type == "cuda" else 1
    norm = cfg.model.norm
    if cfg.model.arch == "sfp":
        norm = "layernorm (ViT: model.norm does not apply)"
    elif norm == "sync_bn" and norm_world == 1:  # what convert_norm builds
        norm = "bn (sync_bn needs CUDA)" if ctx.world > 1 else "bn (sync_bn in one process)"
    if norm == "bn (sync_bn needs CUDA)" and ctx.rank == 0:
        log_.warning(
            "model.norm sync_bn: SyncBatchNorm needs CUDA; on the CPU each of the %d processes "
            "normalises over its own %d images (plain BatchNorm)",
            ctx.world,
            cfg.batch_size,
        )
    return norm_world, norm


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


run = engine.stage_runner(DetectTask)

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

Training follows detectron2's solver: SGD (or AdamW) with ``lr = base_lr * global_batch /
lr_batch_divisor``, linear warm-up from ``warmup_factor * lr`` over ``warmup_iters``, then x
``gamma`` at each of ``steps`` (iterations); no weight decay on normalisation layers
(``weight_decay_norm``), position embeddings and relative position biases; optional layer-wise
lr decay for ViTs. Images without (non-crowd) annotations are left out of training, crowd
regions are dropped from the training targets; augmentation is the horizontal flip here (drawn
from ``(seed, epoch, index)``) and the multi-scale resize inside the detector (drawn from the
global generator, seeded from ``(seed, step)`` before each step, which also fixes the RPN and
RoI sampling). The learning rate is a function of the step, so a checkpoint needs no scheduler
state: restarting the same command resumes from ``checkpoint.pt`` (model, optimizer, grad
scaler, step) and, on the CPU in deterministic mode, ends with the weights of an uninterrupted
run.

The run directory holds ``resolved_config.yaml`` (``derived``: backend, lr, steps, classes, the
init report), ``checkpoint.pt``, ``model.pt`` (detector weights + ``meta``; `load_detector`),
``metrics.jsonl`` (train lines per logged step, eval lines) and ``metrics.json`` (written last):
``ap_box``, ``ap50_box``, ``ap75_box``, ``ap_mask``, ``ap50_mask``, ``ap75_mask``,
``final_loss`` and ``backend``.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import nn
from torch.utils.data import DataLoader, Dataset

from a2mim import atomic, predictions
from a2mim.config import ConfigError, from_dict, to_dict
from a2mim.data.coco import CocoInstances, coco_evaluate, drop_crowd
from a2mim.detection import DetectorSpec, Input, build_detector, resolve_backend
from a2mim.detection.backbone import vit_layer_id
from a2mim.stages.rundir import config_hash, init_tags, open_run, require_init
from a2mim.train import checkpoint, steplog
from a2mim.train.classify import check_backbone, tracked_derived
from a2mim.train.distributed import broadcast_buffers, resolve_device, world_info
from a2mim.train.sampling import EpochSampler, mix_seed

__all__ = [
    "DataConfig",
    "DetectConfig",
    "SolverConfig",
    "build_optimizer",
    "evaluate_detector",
    "load_config",
    "load_detector",
    "lr_factor",
    "run",
]

Target = dict[str, Any]
METRIC_NAMES = {"AP": "ap", "AP50": "ap50", "AP75": "ap75"}
IOU_SUFFIX = {"bbox": "box", "segm": "mask"}


@dataclass(frozen=True)
class DataConfig:
    """A COCO-format instance set: annotation files and image folders relative to ``root``
    (defaults: the official COCO 2017 layout). ``val_limit`` evaluates on the first N
    validation images only (the ground truth is restricted to them)."""

    root: str = "data/coco"
    train_ann: str = "annotations/instances_train2017.json"
    train_images: str = "train2017"
    val_ann: str = "annotations/instances_val2017.json"
    val_images: str = "val2017"
    hflip: float = 0.5
    filter_empty: bool = True
    val_limit: int | None = None
    eval_batch_size: int = 1
    num_workers: int = 0


@dataclass(frozen=True)
class SolverConfig:
    """detectron2's solver (``SOLVER.*``): iterations, not epochs. ``layer_decay`` (ViT only)
    scales block ``i``'s lr by ``layer_decay ** (depth - i)`` (ViTDet / BEiT)."""

    opt: Literal["sgd", "adamw"] = "sgd"
    base_lr: float = 0.02
    lr_batch_divisor: int = 16
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0
    layer_decay: float | None = None
    max_iter: int = 90000
    steps: tuple[int, ...] = (60000, 80000)
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    grad_clip: float | None = None


@dataclass(frozen=True)
class DetectConfig:
    model: DetectorSpec = field(default_factory=DetectorSpec)
    input: Input = field(default_factory=Input)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    backend: Literal["auto", "torchvision", "detectron2"] = "auto"
    scale: Literal["tiny", "small", "paper"] = "paper"
    init: str | None = None  # pretrain encoder.pt / finetune model.pt; null: from scratch
    batch_size: int = 16  # images per process and step
    amp: Literal["none", "bf16", "fp16"] = "none"
    seed: int = 0
    deterministic: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every_steps: int | None = None  # null: evaluate at the end only
    ckpt_every_steps: int = 1000
    log_every_steps: int = 20
    progress: bool = True
    track: bool = True  # MLflow (a2mim.tracking); rank 0 only
    tracking_uri: str | None = None
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags (not hashed)


def load_config(data: dict[str, Any], where: str = "config") -> DetectConfig:
    """Validate a mapping into a ``DetectConfig`` (unknown keys and bad values are errors)."""
    cfg = from_dict(DetectConfig, data, where)
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
    if solver.max_iter < 0 or solver.warmup_iters < 0:
        raise ConfigError(f"{where}: solver.max_iter and warmup_iters must be >= 0")
    for name in ("batch_size", "ckpt_every_steps", "log_every_steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{where}: {name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.data.val_limit is not None and cfg.data.val_limit < 1:
        raise ConfigError(f"{where}: data.val_limit must be >= 1 or null")
    return cfg


# ----------------------------------------------------------------------------- data


class FlippedInstances(Dataset):
    """Training items of a `CocoInstances` subset: key ``(epoch, i)`` gives item
    ``indices[i]`` without crowd instances, flipped horizontally with probability ``p`` by a
    draw seeded from ``(seed, epoch, i)`` (so a resumed run sees the same flips)."""

    def __init__(self, dataset: CocoInstances, indices: list[int], p: float, seed: int):
        self.dataset, self.indices, self.p, self.seed = dataset, indices, p, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, Target]:
        epoch, i = key
        img_chw, target = self.dataset[self.indices[i]]
        target = drop_crowd(target)
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, i))
        if float(torch.rand(1, generator=gen)) < self.p:
            img_chw, target = hflip(img_chw, target)
        return img_chw, target


def hflip(img_chw: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """Mirror an image and its boxes (``x1, y1, x2, y2``) and masks left-right."""
    width = img_chw.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return img_chw.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}


def _collate(items: list[tuple[torch.Tensor, Target]]) -> tuple[list, list]:
    return [img for img, _ in items], [t for _, t in items]


def trainable_indices(dataset: CocoInstances, filter_empty: bool) -> list[int]:
    """Items with at least one non-crowd instance (detectron2's ``FILTER_EMPTY_ANNOTATIONS``),
    or all items."""
    if not filter_empty:
        return list(range(len(dataset)))
    skipped = set(dataset.skipped_ann_ids)
    keep = []
    for i, image_id in enumerate(dataset.ids):
        anns = dataset.coco.imgToAnns.get(image_id, [])
        if any(not a.get("iscrowd", 0) and a["id"] not in skipped for a in anns):
            keep.append(i)
    return keep


def _subset_coco(coco: COCO, image_ids: list[int]) -> COCO:
    """A COCO index over ``image_ids`` only, for COCOeval on part of a validation set."""
    wanted = set(image_ids)
    data = dict(coco.dataset)
    data["images"] = [img for img in coco.dataset["images"] if img["id"] in wanted]
    data["annotations"] = [a for a in coco.dataset["annotations"] if a["image_id"] in wanted]
    sub = COCO()
    sub.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        sub.createIndex()
    return sub


# ----------------------------------------------------------------------------- evaluation


def to_coco_results(
    preds: list[dict[str, torch.Tensor]], image_ids: list[int], dataset: CocoInstances
) -> list[dict[str, Any]]:
    """COCO result dicts (``bbox`` xywh, compressed-RLE ``segmentation``, COCO category id)."""
    results = []
    for pred, image_id in zip(preds, image_ids, strict=True):
        boxes = pred["boxes"].float().cpu()
        masks = pred["masks"].cpu().numpy().astype(np.uint8)
        for box, score, label, mask_hw in zip(
            boxes.tolist(), pred["scores"].tolist(), pred["labels"].tolist(), masks, strict=True
        ):
            rle = mask_utils.encode(np.asfortranarray(mask_hw))
            rle["counts"] = rle["counts"].decode("ascii")
            x1, y1, x2, y2 = box
            results.append(
                {
                    "image_id": image_id,
                    "category_id": dataset.label_to_cat_id(int(label)),
                    "score": float(score),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "segmentation": rle,
                }
            )
    return results


@torch.no_grad()
def evaluate_detector(
    model: nn.Module,
    dataset: CocoInstances,
    device: torch.device,
    batch_size: int = 1,
    limit: int | None = None,
    amp_dtype: torch.dtype | None = None,
    evaluators: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Box and mask AP / AP50 / AP75 (percent) of ``model`` on ``dataset`` (its first
    ``limit`` images), by COCOeval. Each rank predicts a shard; rank 0's result covers all.
    Returns ``{"ap_box", "ap50_box", ..., "ap75_mask", "detections"}``; ``evaluators`` (when
    given) receives the COCOeval objects (:func:`a2mim.data.coco.coco_evaluate`)."""
    rank, world = world_info()
    count = len(dataset) if limit is None else min(limit, len(dataset))
    shard = list(range(rank, count, world))
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    for start in range(0, len(shard), batch_size):
        idx = shard[start : start + batch_size]
        images = [dataset.load_image(dataset.ids[i]).to(device) for i in idx]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            preds = model(images)
        results += to_coco_results(preds, [dataset.ids[i] for i in idx], dataset)
    model.train(was_training)
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    ids = dataset.ids[:count]
    gt = dataset.coco if count == len(dataset) else _subset_coco(dataset.coco, ids)
    ap = coco_evaluate(gt, results, evaluators=evaluators)
    metrics = {
        f"{METRIC_NAMES[name]}_{IOU_SUFFIX[iou]}": value
        for key, value in ap.items()
        for iou, name in [key.split("/")]
    }
    return {**metrics, "detections": float(len(results))}


# ----------------------------------------------------------------------------- optimisation


def lr_factor(step: int, solver: SolverConfig) -> float:
    """detectron2's ``WarmupMultiStepLR`` factor at iteration ``step`` (0-based): linear
    warm-up from ``warmup_factor`` to 1 over ``warmup_iters``, times ``gamma`` per passed step."""
    factor = solver.gamma ** bisect.bisect_right(solver.steps, step)
    if step < solver.warmup_iters:
        alpha = step / solver.warmup_iters
        factor *= solver.warmup_factor * (1 - alpha) + alpha
    return factor


def _is_norm(module: nn.Module) -> bool:
    """Normalisation layers of torch, timm and detectron2 (whose LayerNorm is its own class)."""
    torch_norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
    return isinstance(module, torch_norms) or "Norm" in type(module).__name__


_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "relative_position_bias_table")


def param_groups(model: nn.Module, solver: SolverConfig, vit_depth: int | None) -> list[dict]:
    """Parameter groups with their ``weight_decay`` and ``lr_scale``: normalisation layers get
    ``weight_decay_norm``, embeddings and relative position biases none, the rest
    ``weight_decay``; with ``layer_decay`` (ViT of ``vit_depth`` blocks) ``lr_scale`` follows
    `a2mim.detection.backbone.vit_layer_id`."""
    norm_params = {
        id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)
    }
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if id(param) in norm_params:
            decay = solver.weight_decay_norm
        elif name.split(".")[-1] in _NO_DECAY_NAMES:
            decay = 0.0
        else:
            decay = solver.weight_decay
        scale = 1.0
        if solver.layer_decay is not None and vit_depth is not None:
            scale = solver.layer_decay ** (vit_depth + 1 - vit_layer_id(name, vit_depth))
        groups.setdefault((decay, scale), []).append(param)
    return [
        {"params": params, "weight_decay": decay, "lr_scale": scale}
        for (decay, scale), params in sorted(groups.items())
    ]


def build_optimizer(
    model: nn.Module, solver: SolverConfig, lr: float, vit_depth: int | None = None
) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over `param_groups`; each group's lr is set per step by the
    stage as ``lr * lr_scale * lr_factor(step)``."""
    groups = [{**g, "lr": lr * g["lr_scale"]} for g in param_groups(model, solver, vit_depth)]
    if solver.opt == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=solver.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=solver.betas)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] * factor


# ----------------------------------------------------------------------------- run


def _vit_depth(model: nn.Module) -> int | None:
    for module in model.modules():
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.Sequential | nn.ModuleList) and hasattr(module, "patch_embed"):
            return len(blocks)
    return None


def _open_datasets(cfg: DetectConfig) -> tuple[CocoInstances, CocoInstances]:
    root = Path(cfg.data.root)
    train = CocoInstances(root / cfg.data.train_ann, root / cfg.data.train_images)
    val = CocoInstances(root / cfg.data.val_ann, root / cfg.data.val_images)
    if train.cat_ids != val.cat_ids:
        raise ValueError(
            f"{root}: the category ids of {cfg.data.train_ann} ({train.cat_ids}) and "
            f"{cfg.data.val_ann} ({val.cat_ids}) differ; both splits need the same categories"
        )
    return train, val


def run(
    cfg: DetectConfig, out_dir: str | Path, stop_after_steps: int | None = None
) -> dict[str, Any]:
    """Train (or resume) and evaluate into ``out_dir``; returns the final metrics.

    ``stop_after_steps`` (tests) returns right after that many steps, with nothing written
    beyond the periodic checkpoints, as if the process had been killed there.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = world_info()
    backend = resolve_backend(cfg.backend)
    device = resolve_device(cfg.device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
    require_init(cfg.init)
    train_set, val_set = _open_datasets(cfg)
    train_idx = trainable_indices(train_set, cfg.data.filter_empty)
    global_batch = cfg.batch_size * world
    steps_per_epoch = len(train_idx) // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{cfg.data.root}/{cfg.data.train_ann} has {len(train_idx)} trainable images, fewer "
            f"than one global batch of {global_batch} (batch_size x processes): lower batch_size"
        )
    solver = cfg.solver
    total_steps = solver.max_iter
    lr = solver.base_lr * global_batch / solver.lr_batch_divisor

    torch.manual_seed(cfg.seed)
    model = build_detector(
        backend, cfg.model, cfg.input, len(train_set.cat_ids), cfg.init, world_size=world
    )
    model.to(device)
    vit_depth = _vit_depth(model)
    optimizer = build_optimizer(model, solver, lr, vit_depth)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    init_report = model.init_report
    derived = {
        "backend": backend,
        "global_batch": global_batch,
        "lr": lr,
        "steps_per_epoch": steps_per_epoch,
        "epochs": total_steps / steps_per_epoch,
        "world_size": world,
        "num_images": len(train_set),
        "num_train_images": len(train_idx),
        "num_val_images": len(val_set)
        if cfg.data.val_limit is None
        else min(cfg.data.val_limit, len(val_set)),
        "num_classes": len(train_set.cat_ids),
        "classes": list(train_set.class_names),
        "num_params": sum(p.numel() for p in model.parameters()),  # shared C4 res5 once
        "init": init_report,
        # the hash covers the resolved backend: "auto" must not resume under another library
        "config_hash": config_hash(dataclasses.replace(cfg, backend=backend)),
    }
    state, tracker = open_run(
        "detect",
        cfg,
        out,
        derived,
        tags={**init_tags(cfg.model.backbone, init_report), "backend": backend},
        rank=rank,
        tracked=tracked_derived(derived),
    )
    ckpt_path = out / "checkpoint.pt"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    with tracker:
        if rank == 0:
            tracker.log_artifact(out / "resolved_config.yaml")
        step = 0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            step = int(state["step"])
            steplog.truncate(out / "metrics.jsonl", step)
        flipped = FlippedInstances(train_set, train_idx, cfg.data.hflip, cfg.seed)
        log = steplog.TrainLog.of_stage(
            cfg, out, tracker, total_steps, step, rank, "detect", loss_format=".3f"
        )
        last_eval: dict[str, float] | None = None

        def save(step_done: int) -> None:
            if rank != 0:
                return
            tracker.flush()  # the metrics up to this step reach the store before the checkpoint
            ckpt = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step_done,
                "config_hash": derived["config_hash"],
            }
            checkpoint.atomic_save(ckpt, ckpt_path)

        def run_eval(step_done: int) -> dict[str, float]:
            broadcast_buffers(model)  # every rank evaluates with rank 0's BatchNorm statistics
            evaluators: dict[str, Any] = {}
            row = evaluate_detector(
                model,
                val_set,
                device,
                cfg.data.eval_batch_size,
                cfg.data.val_limit,
                amp_dtype,
                evaluators,
            )
            if step_done == total_steps and rank == 0 and evaluators:  # for the paired statistics
                found = predictions.detection_from_cocoeval(
                    evaluators, stage="detect", step=step_done
                )
                predictions.write(predictions.path_of(out), found)
            log.record(step_done, row)
            return row

        while step < total_steps:
            epoch, pos = divmod(step, steps_per_epoch)
            sampler = EpochSampler(
                len(train_idx),
                cfg.seed,
                epoch,
                start=pos * cfg.batch_size,
                rank=rank,
                world_size=world,
                usable=steps_per_epoch * global_batch,
            )
            loader = DataLoader(
                flipped,
                batch_size=cfg.batch_size,
                sampler=sampler,
                num_workers=cfg.data.num_workers,
                collate_fn=_collate,
                drop_last=True,
            )
            batches = iter(loader)
            epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
            for step in range(step, epoch_end):  # noqa: B020
                model.train()
                _set_lr(optimizer, lr, lr_factor(step, solver))
                torch.manual_seed(mix_seed(cfg.seed, 1, step, rank))  # resize, RPN/RoI sampling
                images, targets = next(batches)
                losses = _train_step(
                    train_model, optimizer, scaler, images, targets, device, amp_dtype, solver
                )
                loss_value = sum(losses.values())
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"non-finite loss {loss_value} at step {step} ({losses}); lower "
                        f"solver.base_lr, lengthen the warm-up, or use norm: bn when training "
                        f"from scratch"
                    )
                done = step + 1
                row = {
                    "loss": loss_value,
                    **losses,
                    "lr": lr * lr_factor(step, solver),
                    "epoch": done / steps_per_epoch,
                }
                log.step(done, global_batch, row)
                evaluates = cfg.eval_every_steps and done % cfg.eval_every_steps == 0
                if evaluates and done < total_steps:
                    last_eval = run_eval(done)
                if done % cfg.ckpt_every_steps == 0 and done < total_steps:
                    save(done)
                if stop_after_steps is not None and done >= stop_after_steps:
                    log.close()
                    tracker.close("KILLED")  # interrupted; a restart sets the run RUNNING again
                    return {"stopped_at_step": float(done)}
            step = epoch_end
        log.close()

        last_eval = run_eval(total_steps)
        save(total_steps)
        metrics: dict[str, Any] = {k: v for k, v in last_eval.items() if k != "detections"}
        if log.last:
            metrics["final_loss"] = log.last["loss"]
        metrics["backend"] = backend
        if rank == 0:
            meta = {
                "stage": "detect",
                "backend": backend,
                "model": to_dict(cfg.model),
                "input": to_dict(cfg.input),
                "num_classes": len(train_set.cat_ids),
                "classes": list(train_set.class_names),
                "cat_ids": list(train_set.cat_ids),
                "init": cfg.init,
                "init_sha256": None if init_report is None else init_report["sha256"],
                "config_hash": derived["config_hash"],
                "steps": total_steps,
            }
            checkpoint.atomic_save(
                {"state_dict": model.state_dict(), "meta": meta}, out / "model.pt"
            )
            atomic.write_text(out / "metrics.json", json.dumps(metrics, indent=2))
            tracker.log_artifact(out / "metrics.json")
            if predictions.path_of(out).is_file():  # none when the model detected nothing
                tracker.log_artifact(predictions.path_of(out), predictions.FOLDER)
        return metrics


def _train_step(
    train_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    images: list[torch.Tensor],
    targets: list[Target],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    solver: SolverConfig,
) -> dict[str, float]:
    """One optimisation step on a batch; returns the detector's losses. A non-finite total
    skips the update (the caller stops the run)."""
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: _to(v, device) for k, v in t.items()} for t in targets]
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        losses = train_model(images, targets)
    loss = sum(losses.values())
    values = {k: float(v.detach()) for k, v in losses.items()}
    if not math.isfinite(float(loss.detach())):
        optimizer.zero_grad(set_to_none=True)
        return values
    scaler.scale(loss).backward()
    if solver.grad_clip is not None:
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        nn.utils.clip_grad_norm_(params, solver.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return values


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


def load_detector(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The detector stored in a ``detect`` run's ``model.pt``, in eval mode, with its ``meta``
    (backend, model spec, input sizes, classes, COCO category ids)."""
    saved = checkpoint.load(path)
    meta = saved["meta"]
    if meta.get("stage") != "detect":
        raise ValueError(f"{path} is from stage {meta.get('stage')!r}, not detect")
    spec = from_dict(DetectorSpec, meta["model"], f"{path}: meta.model")
    inputs = from_dict(Input, meta["input"], f"{path}: meta.input")
    model = build_detector(resolve_backend(meta["backend"]), spec, inputs, meta["num_classes"])
    model.load_state_dict(saved["state_dict"], strict=True)
    return model.eval(), meta

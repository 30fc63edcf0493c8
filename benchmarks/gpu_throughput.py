"""Does the GPU wait for anything but the A²MIM step? Training throughput from JPEG files.

For ResNet-50 and ViT-B at 224 px in bf16 (``a2mim_resnet50`` / ``a2mim_vit_base`` presets), in
one run and interleaved (every round times every variant once, in alternating order), this times:

* (a) ``backbone``: the bare timm backbone's training step (forward, cross-entropy on random
  labels, backward, AdamW step) on a device-resident synthetic batch: the floor;
* (b) ``a2mim``: the A²MIM training step (mask, RGB-mean fill, token, decoder, spatial +
  frequency loss, backward, AdamW) on the same batch;
* (c) ``pipe_<path>``: the A²MIM step fed from JPEG files through each data path:
  ``pil`` (DataLoader workers decode with PIL and run the reference transform; pinned memory,
  ``non_blocking`` copies, persistent workers) and ``device`` (workers only read the files'
  bytes; :class:`a2mim.data.device_pipeline.DeviceAugment` decodes with nvJPEG and crops on the
  GPU); both through :class:`a2mim.data.device_pipeline.DevicePrefetcher`, which prepares the
  next batch on a side CUDA stream while the current step runs;
* ``data_<path>``: each data path alone (no step), in img/s, beside the machine's CPU count.

It prints img/s for each, (b)/(a), (c)/(b) per data path, and the model FLOP utilisation
(MFU = measured training FLOP/s over the GPU's dense bf16 peak) of ViT-B; training FLOPs are 3x
the forward FLOPs counted by ``torch.utils.flop_counter`` on the A²MIM model. Synthetic JPEGs
(smooth noise, ImageNet-like 500x375, quality 90) are written to a temporary folder unless
``--data`` names an ImageFolder root with a ``train`` split. It ends with one line per model,
``ratios <model>: a2mim/backbone=... pipe_pil/a2mim=... pipe_device/a2mim=... [mfu_...]``, and
the total wall time.

    python benchmarks/gpu_throughput.py                  # a GPU: both models, <= 5 min on H100
    python benchmarks/gpu_throughput.py --cpu-smoke      # CPU: small models, seconds (a test)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from a2mim.data.device_pipeline import (
    CropRecipe,
    DeviceAugment,
    DevicePrefetcher,
    EncodedImages,
    collate_encoded,
)
from a2mim.data.imagefolder import ImageFolderDataset
from a2mim.data.transforms import pretrain_transform
from a2mim.mim import MaskedImageModel, get_preset

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}  # dense
FULL = {"models": ["resnet50", "vit_base"], "batch": 128, "steps": 12, "rounds": 3, "warmup": 4}
SMOKE = {"models": ["resnet18", "vit_tiny"], "batch": 4, "steps": 2, "rounds": 1, "warmup": 1}
CROP_SCALE = {"resnet": (0.8, 1.0), "vit": (0.67, 1.0)}  # the pretrain_* recipes' crop_scale
PRESET = {
    "resnet50": "a2mim_resnet50",
    "vit_base": "a2mim_vit_base",
    "resnet18": "a2mim_resnet18",
    "vit_tiny": "a2mim_vit_tiny",
}


def write_jpegs(root: Path, count: int, size: tuple[int, int], classes: int = 4) -> None:
    """``count`` JPEGs of ``size`` (w, h) under ``root/train/c<k>/``: smooth random colour
    fields (realistic file sizes and decode cost, unlike white noise)."""
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(count):
        folder = root / "train" / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 13, size=(h, w, 3))
        arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def endless(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


class Bench:
    """The models, batches and loaders of one backbone; each variant runs ``steps`` steps."""

    def __init__(self, label: str, args: argparse.Namespace, data_root: Path, device) -> None:
        self.device = device
        self.steps = args.steps
        self.amp = torch.bfloat16 if args.amp == "bf16" else None
        cfg = get_preset(PRESET[label])
        self.cfg = cfg
        self.channels_last = label.startswith("resnet")
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        torch.manual_seed(0)
        kwargs = dict(cfg.backbone_kwargs)
        if "vit" in cfg.backbone:
            kwargs["img_size"] = cfg.img_size
        self.backbone = timm.create_model(cfg.backbone, num_classes=1000, **kwargs)
        self.backbone = self.backbone.to(device, memory_format=fmt).train()
        self.mim = MaskedImageModel(cfg).to(device, memory_format=fmt).train()
        self.opt_bb = torch.optim.AdamW(self.backbone.parameters(), lr=1e-4, fused=self._fused())
        self.opt_mim = torch.optim.AdamW(self.mim.param_groups(0.05), lr=1e-4, fused=self._fused())
        if args.compile:
            self.backbone_fwd = torch.compile(self.backbone)
            self.mim_fwd = torch.compile(self.mim)
        else:
            self.backbone_fwd, self.mim_fwd = self.backbone, self.mim
        b, s = args.batch, cfg.img_size
        gen = torch.Generator().manual_seed(0)
        self.img = torch.randn(b, 3, s, s, generator=gen).to(device, memory_format=fmt)
        self.labels = torch.randint(0, 1000, (b,), generator=gen).to(device)
        self.mask_gen = torch.Generator().manual_seed(1)

        images = ImageFolderDataset(data_root, "train")
        workers = args.workers
        common = {
            "batch_size": b,
            "shuffle": True,
            "drop_last": True,
            "num_workers": workers,
            "pin_memory": device.type == "cuda",
            "persistent_workers": workers > 0,
            **({"prefetch_factor": 2} if workers > 0 else {}),
        }
        scale = CROP_SCALE["resnet" if self.channels_last else "vit"]
        images.transform = pretrain_transform(s, scale)
        self.pil_batches = endless(DataLoader(images, **common))
        encoded = EncodedImages(ImageFolderDataset(data_root, "train"))
        self.raw_batches = endless(DataLoader(encoded, collate_fn=collate_encoded, **common))
        self.augment = DeviceAugment(CropRecipe(s, scale=scale), device)
        self.aug_gen = torch.Generator().manual_seed(2)
        # both paths prepare batch k + 1 (copy / decode + crop) on a side stream during step k
        self.pil_ready = iter(DevicePrefetcher(self.pil_batches, self._copy_pil, device))
        self.device_ready = iter(DevicePrefetcher(self.raw_batches, self._augment, device))

    def _fused(self) -> bool | None:
        return True if self.device.type == "cuda" else None

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def step_backbone(self, img: torch.Tensor) -> None:
        with self._autocast():
            loss = torch.nn.functional.cross_entropy(self.backbone_fwd(img).float(), self.labels)
        self.opt_bb.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_bb.step()

    def step_a2mim(self, img: torch.Tensor) -> None:
        mask = self.mim.masker(img.shape[0], generator=self.mask_gen)
        with self._autocast():
            loss = self.mim_fwd(img, mask.to(self.device, non_blocking=True)).loss
        self.opt_mim.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_mim.step()

    def _format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def _copy_pil(self, batch) -> torch.Tensor:
        img = batch[0].to(self.device, non_blocking=True)  # pinned by the DataLoader
        return img.contiguous(memory_format=self._format())

    def _augment(self, batch) -> torch.Tensor:
        img = self.augment(batch[0], self.aug_gen)
        return img.contiguous(memory_format=self._format())

    def next_pil(self) -> torch.Tensor:
        return next(self.pil_ready)

    def next_device(self) -> torch.Tensor:
        return next(self.device_ready)

    def variants(self) -> dict[str, Callable[[], None]]:
        return {
            "backbone": lambda: self.step_backbone(self.img),
            "a2mim": lambda: self.step_a2mim(self.img),
            "pipe_pil": lambda: self.step_a2mim(self.next_pil()),
            "pipe_device": lambda: self.step_a2mim(self.next_device()),
            "data_pil": self.next_pil,
            "data_device": self.next_device,
        }

    def train_flops_per_image(self) -> float:
        """3x the forward FLOPs of the A²MIM model on one image (flop_counter)."""
        one = self.img[:1]
        mask = self.mim.masker(1, generator=torch.Generator().manual_seed(0)).to(self.device)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad(), self._autocast():
            self.mim(one, mask)
        return 3.0 * counter.get_total_flops()


def time_variant(bench: Bench, fn: Callable[[], None]) -> float:
    sync(bench.device)
    start = time.perf_counter()
    for _ in range(bench.steps):
        fn()
    sync(bench.device)
    return time.perf_counter() - start


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def run_model(label: str, args, data_root: Path, device: torch.device) -> dict[str, float]:
    bench = Bench(label, args, data_root, device)
    variants = bench.variants()
    for _ in range(args.warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        names = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for name in names:
            times[name].append(time_variant(bench, variants[name]))
    images = args.batch * args.steps
    ips = {name: images / statistics.median(t) for name, t in times.items()}
    print(
        f"{label}: batch={args.batch} steps={args.steps} rounds={args.rounds} amp={args.amp} "
        f"compile={args.compile} workers={args.workers} cpus={os.cpu_count()}"
    )
    for name, value in ips.items():
        print(f"  {name:12s} {value:10.1f} img/s")
    result = {f"ips_{k}": v for k, v in ips.items()}
    result["a2mim/backbone"] = ips["a2mim"] / ips["backbone"]
    for path in ("pil", "device"):
        result[f"pipe_{path}/a2mim"] = ips[f"pipe_{path}"] / ips["a2mim"]
    peak = peak_flops(device, args.peak_tflops)
    if label.startswith("vit"):
        flops = bench.train_flops_per_image()
        result["train_gflops_per_image"] = flops / 1e9
        if peak:
            result["mfu_a2mim"] = ips["a2mim"] * flops / peak
            result["mfu_pipe_device"] = ips["pipe_device"] * flops / peak
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="small models, few steps, CPU")
    parser.add_argument("--models", nargs="+", choices=sorted(PRESET))
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int, help="steps per variant and round")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--warmup", type=int, help="untimed rounds")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: CPU count)")
    parser.add_argument("--images", type=int, help="synthetic JPEGs to write (default 2048)")
    parser.add_argument("--data", type=Path, help="an ImageFolder root with a train split")
    parser.add_argument("--amp", choices=["bf16", "none"], default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU")
    args = parser.parse_args(argv)
    preset = SMOKE if args.cpu_smoke else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.workers is None:
        args.workers = 0 if args.cpu_smoke else (os.cpu_count() or 1)
    if args.images is None:
        args.images = 16 if args.cpu_smoke else 2048
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True  # static shapes
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        parser.error("no CUDA device: run on a GPU, or pass --cpu-smoke for the reduced CPU run")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="a2mim-jpegs-") as tmp:
        data_root = args.data
        if data_root is None:
            data_root = Path(tmp)
            write_jpegs(data_root, args.images, (500, 375) if not args.cpu_smoke else (48, 40))
            print(f"wrote {args.images} synthetic JPEGs in {time.perf_counter() - started:.1f} s")
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"device={device_name} torch={torch.__version__} cpus={os.cpu_count()}")
        results = {label: run_model(label, args, data_root, device) for label in args.models}
    for label, r in results.items():
        shown = " ".join(
            f"{k}={v:.3f}" for k, v in r.items() if "/" in k or k.startswith(("mfu", "train"))
        )
        print(f"ratios {label}: {shown}")
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()

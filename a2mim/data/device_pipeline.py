"""The device data path: images travel as encoded bytes and are decoded and augmented in batches
on the training device (``data.pipeline: device``); the PIL path of :mod:`a2mim.data.transforms`
stays the reference and the CPU default.

Per batch, on ``device`` (the same code on CPU tensors, which is how the tests check it):

1. **decode** JPEGs with one batched ``torchvision.io.decode_jpeg`` call (nvJPEG on CUDA,
   libjpeg-turbo on CPU, bit-identical to PIL's decode there); other formats (PNG, ...) are
   decoded on the CPU by ``torchvision.io.decode_image`` and moved; 16-bit grayscale is scaled to
   8 bits as in :func:`a2mim.data.imagefolder.to_rgb`;
2. **random resized crop**: the boxes are drawn on the CPU by :func:`sample_crop_boxes`, a
   vectorised copy of torchvision's ``RandomResizedCrop.get_params`` (10 attempts, then the
   central fallback crop; same distribution, checked by a two-sample KS test), then each crop is
   resized on the device with the recipe's interpolation (antialiased, uint8 in and out, as PIL);
3. **horizontal flip** with probability ``hflip``;
4. **normalise** with exactly the arithmetic of ``ToTensor()`` + ``Normalize(mean, std)``
   (``x / 255``, then ``(x - mean) / std``), so equal uint8 pixels give bit-equal inputs.

For fine-tuning, :class:`DeviceAugment` adds timm's ``RandomErasing`` on the device (per image,
as timm applies it after normalisation); mixup / cutmix is timm's ``Mixup``, which the stage
already applies to device tensors. RandAugment / AutoAugment and colour jitter are PIL-only in
timm: the device path refuses a recipe that asks for them (:func:`check_supported`) rather than
silently training with other augmentations. The mask (49 booleans per image at 224 px) is drawn
by the stage's seeded generator and the RGB-mean fill happens inside the model's forward, i.e.
already on the device.

torchvision 0.29 marks its image decoders deprecated (in favour of TorchCodec, not installed
here); they work, and the warning they raise on every call is silenced in this module.

How much the device path differs from PIL: decode identical (CPU), crop boxes from the same
distribution (not the same draws: another random stream), resize within a few grey levels (the
antialiased bicubic kernels of PIL and torch differ slightly), flip and normalisation identical.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from a2mim.data.imagefolder import CorruptImageError, ImageFolderDataset
from a2mim.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "CropRecipe",
    "DeviceAugment",
    "DevicePrefetcher",
    "EncodedImages",
    "check_supported",
    "collate_encoded",
    "decode_batch",
    "normalize_uint8",
    "sample_crop_boxes",
]

log = logging.getLogger(__name__)

Pipeline = Literal["pil", "device"]
_JPEG_MAGIC = (0xFF, 0xD8, 0xFF)
_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params
_INTERPOLATION = {
    "bicubic": TF.InterpolationMode.BICUBIC,
    "bilinear": TF.InterpolationMode.BILINEAR,
}


@dataclass(frozen=True)
class CropRecipe:
    """The random-resized-crop + flip part of a recipe.

    Attributes:
        size: output side in pixels.
        scale: area fraction range of the crop (torchvision ``scale``).
        ratio: aspect ratio (w / h) range (torchvision default (3/4, 4/3)).
        interpolation: ``"bicubic"`` (A2MIM pre-training, timm fine-tuning) or ``"bilinear"``.
        hflip: probability of a horizontal flip.
        reprob: timm RandomErasing probability (fine-tuning; 0 = off), with ``remode`` and
            ``recount`` as in timm.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    hflip: float = 0.5
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive integer, got {self.size!r}")
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale!r}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio!r}")
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(
                f"interpolation {self.interpolation!r} is not supported by the device path; "
                f"use one of {sorted(_INTERPOLATION)} or data.pipeline: pil"
            )
        if not 0.0 <= self.hflip <= 1.0 or not 0.0 <= self.reprob <= 1.0:
            raise ValueError(f"hflip and reprob are probabilities, got {self.hflip}, {self.reprob}")


def check_supported(auto_augment: str | None, color_jitter: float | None) -> None:
    """Refuse fine-tuning augmentations the device path does not have (timm's are PIL-only)."""
    if auto_augment:
        raise ValueError(
            f"data.auto_augment={auto_augment!r} (timm RandAugment/AutoAugment) runs on PIL "
            "images only; set data.pipeline: pil for this recipe, or data.auto_augment: null "
            "to train without it on the device path"
        )
    if color_jitter:
        raise ValueError(
            f"data.color_jitter={color_jitter} is not implemented on the device path; set "
            "data.pipeline: pil, or data.color_jitter: null"
        )


class EncodedImages(Dataset):
    """An :class:`ImageFolderDataset` whose items are the files' bytes, not decoded images.

    ``__getitem__(i)`` returns ``(bytes_n uint8 tensor, target, i)``; workers only read files.
    A key ``(epoch, i)`` or ``(epoch, copy, i)`` (what the stages' samplers yield) reads sample
    ``i``; the rest plays no part, since the augmentation happens later, per batch.
    """

    def __init__(self, images: ImageFolderDataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, ...]) -> tuple[Tensor, int, int]:
        index = key[-1] if isinstance(key, tuple) else key
        path, target = self.images.samples[index]
        with open(path, "rb") as handle:
            data = handle.read()
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), target, index


def collate_encoded(
    batch: Sequence[tuple[Tensor, int, int]],
) -> tuple[list[Tensor], Tensor, Tensor]:
    """DataLoader ``collate_fn``: ``(list of byte tensors, targets_b, indices_b)``."""
    data = [item[0] for item in batch]
    targets = torch.tensor([item[1] for item in batch], dtype=torch.long)
    indices = torch.tensor([item[2] for item in batch], dtype=torch.long)
    return data, targets, indices


@contextmanager
def _quiet_decoders() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
        yield


def _is_jpeg(data_n: Tensor) -> bool:
    return len(data_n) >= 3 and tuple(data_n[:3].tolist()) == _JPEG_MAGIC


def _decode_other(data_n: Tensor) -> Tensor:
    """A non-JPEG file (PNG, ...) on the CPU as uint8 ``(3, H, W)``; 16-bit scaled to 8 bits."""
    with _quiet_decoders():
        img_chw = decode_image(data_n, mode=ImageReadMode.UNCHANGED)
    if img_chw.dtype != torch.uint8:  # 16-bit PNG: round(v / 257) as imagefolder.to_rgb
        img_chw = torch.round(img_chw.double() / 257.0).to(torch.uint8)
    if img_chw.shape[0] in (2, 4):  # drop alpha
        img_chw = img_chw[:-1]
    if img_chw.shape[0] == 1:
        img_chw = img_chw.expand(3, -1, -1)
    return img_chw


def decode_batch(
    data: Sequence[Tensor],
    device: torch.device | str,
    paths: Sequence[str] = (),
    on_corrupt: Literal["error", "skip"] = "error",
) -> list[Tensor]:
    """Decode encoded images to uint8 RGB ``(3, H_i, W_i)`` tensors on ``device``.

    JPEGs go through one batched ``decode_jpeg`` on ``device``; other formats through
    ``decode_image`` on the CPU. A file that fails raises :class:`CorruptImageError` naming it
    (``paths[i]`` if given); with ``on_corrupt="skip"`` it is replaced by the next readable
    image of the batch (wrapping around) and named in a logged warning.
    """
    if on_corrupt == "skip":
        try:
            return decode_batch(data, device, paths)
        except CorruptImageError:
            return _decode_skipping(data, torch.device(device), paths)
    device = torch.device(device)
    out: list[Tensor | None] = [None] * len(data)
    jpeg_at = [i for i, d in enumerate(data) if _is_jpeg(d)]

    def fail(i: int, err: Exception) -> CorruptImageError:
        name = paths[i] if i < len(paths) else f"batch item {i}"
        return CorruptImageError(
            f"image {name} is corrupt or unreadable ({type(err).__name__}: {err}); replace or "
            "delete it",
            paths=[name],
        )

    if jpeg_at:
        try:
            with _quiet_decoders():
                decoded = decode_jpeg(
                    [data[i] for i in jpeg_at], mode=ImageReadMode.RGB, device=device
                )
        except RuntimeError:  # find the culprit one by one (rare path)
            decoded = []
            for i in jpeg_at:
                try:
                    with _quiet_decoders():
                        img_chw = decode_jpeg(data[i], mode=ImageReadMode.RGB, device=device)
                except RuntimeError as err:
                    raise fail(i, err) from err
                decoded.append(img_chw)
        for i, img_chw in zip(jpeg_at, decoded, strict=True):
            out[i] = img_chw
    for i, d in enumerate(data):
        if out[i] is None:
            try:
                out[i] = _decode_other(d).to(device, non_blocking=True)
            except RuntimeError as err:
                raise fail(i, err) from err
    return out  # type: ignore[return-value]


def _decode_skipping(
    data: Sequence[Tensor], device: torch.device, paths: Sequence[str]
) -> list[Tensor]:
    good: dict[int, Tensor] = {}
    for i, d in enumerate(data):
        try:
            good[i] = decode_batch([d], device, [paths[i]] if i < len(paths) else ())[0]
        except CorruptImageError as err:
            log.warning("device pipeline: skipping a corrupt image (data.skip_corrupt): %s", err)
    if not good:
        raise CorruptImageError(
            f"every image of a batch of {len(data)} is corrupt or unreadable; replace them",
            paths=list(paths),
        )
    order = sorted(good)
    return [
        good.get(i, good[next((j for j in order if j > i), order[0])]) for i in range(len(data))
    ]


def sample_crop_boxes(
    heights: Tensor,
    widths: Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random-resized-crop boxes with torchvision's ``RandomResizedCrop.get_params`` algorithm.

    For each image: up to 10 attempts of (area fraction ~ U(scale), log aspect ~
    U(log ratio), ``w = round(sqrt(area * aspect))``, ``h = round(sqrt(area / aspect))``); the
    first that fits gets a uniform position; if none fits, the central crop of the largest
    in-ratio box. Vectorised over the batch (all attempts drawn at once).

    Args:
        heights, widths: (B,) long image sizes.

    Returns:
        (B, 4) long ``(top, left, h, w)``.
    """
    b = len(heights)
    h_b, w_b = heights.double(), widths.double()
    area_b = h_b * w_b
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    u_scale = torch.rand(b, _ATTEMPTS, generator=generator, dtype=torch.float64)
    u_ratio = torch.rand(b, _ATTEMPTS, generator=generator, dtype=torch.float64)
    u_top = torch.rand(b, _ATTEMPTS, generator=generator, dtype=torch.float64)
    u_left = torch.rand(b, _ATTEMPTS, generator=generator, dtype=torch.float64)
    target_ba = area_b[:, None] * (scale[0] + (scale[1] - scale[0]) * u_scale)
    aspect_ba = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    cw_ba = torch.round(torch.sqrt(target_ba * aspect_ba))
    ch_ba = torch.round(torch.sqrt(target_ba / aspect_ba))
    fits_ba = (cw_ba > 0) & (cw_ba <= w_b[:, None]) & (ch_ba > 0) & (ch_ba <= h_b[:, None])
    first_b = torch.where(fits_ba.any(1), fits_ba.int().argmax(1), -1)
    pick = first_b.clamp(min=0)[:, None]
    ch_b, cw_b = ch_ba.gather(1, pick)[:, 0], cw_ba.gather(1, pick)[:, 0]
    # uniform integer positions in [0, H - h] and [0, W - w]
    top_b = torch.floor(u_top.gather(1, pick)[:, 0] * (h_b - ch_b + 1)).clamp(max=h_b - ch_b)
    left_b = torch.floor(u_left.gather(1, pick)[:, 0] * (w_b - cw_b + 1)).clamp(max=w_b - cw_b)

    # fallback: the central crop of the whole image clipped to the ratio range
    in_ratio_b = w_b / h_b
    fb_w = torch.where(
        in_ratio_b < ratio[0],
        w_b,
        torch.where(in_ratio_b > ratio[1], torch.round(h_b * ratio[1]), w_b),
    )
    fb_h = torch.where(in_ratio_b < ratio[0], torch.round(w_b / ratio[0]), h_b)
    fb_top, fb_left = torch.floor((h_b - fb_h) / 2), torch.floor((w_b - fb_w) / 2)
    use_fb = first_b < 0
    box_b4 = torch.stack(
        [
            torch.where(use_fb, fb_top, top_b),
            torch.where(use_fb, fb_left, left_b),
            torch.where(use_fb, fb_h, ch_b),
            torch.where(use_fb, fb_w, cw_b),
        ],
        dim=1,
    )
    return box_b4.long()


def normalize_uint8(
    img_bchw: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
    """uint8 -> float32 with the arithmetic of ``ToTensor()`` then ``Normalize(mean, std)``."""
    x = img_bchw.float().div(255)
    mean_c11 = torch.as_tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    std_c11 = torch.as_tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return x.sub(mean_c11).div(std_c11)


class DeviceAugment:
    """Decode + random resized crop + flip + normalise (+ random erasing) of one batch.

    Args:
        recipe: the crop / flip / erasing settings.
        device: where decoding and the pixel work run (``"cuda"`` on a GPU; ``"cpu"`` works).
        mean, std: normalisation.
        on_corrupt: ``"skip"`` replaces a file that fails to decode by another image of the
            batch, with a warning naming it (stage configs: ``data.skip_corrupt``).

    ``__call__(data, generator, paths=())`` takes the encoded bytes of a batch and a CPU
    generator (crop boxes, flips and erasing draws come from it, so a seeded generator gives the
    same batch on every machine) and returns ``img_bchw`` float32 on ``device``.
    """

    def __init__(
        self,
        recipe: CropRecipe,
        device: torch.device | str = "cpu",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        on_corrupt: Literal["error", "skip"] = "error",
    ) -> None:
        self.recipe = recipe
        self.on_corrupt = on_corrupt
        self.device = torch.device(device)
        self.mean, self.std = tuple(mean), tuple(std)
        self._erase = None
        if recipe.reprob > 0:
            from timm.data.random_erasing import RandomErasing

            self._erase = RandomErasing(
                recipe.reprob, mode=recipe.remode, max_count=recipe.recount, device="cpu"
            )

    def crops(self, images: Sequence[Tensor], generator: torch.Generator | None) -> Tensor:
        """uint8 ``(B, 3, size, size)`` crops of decoded images (flip included)."""
        r = self.recipe
        heights = torch.tensor([img.shape[-2] for img in images])
        widths = torch.tensor([img.shape[-1] for img in images])
        boxes_b4 = sample_crop_boxes(heights, widths, r.scale, r.ratio, generator)
        flips_b = torch.rand(len(images), generator=generator) < r.hflip
        out = []
        for img_chw, (top, left, h, w), flip in zip(
            images, boxes_b4.tolist(), flips_b.tolist(), strict=True
        ):
            crop = TF.resized_crop(
                img_chw,
                top,
                left,
                h,
                w,
                [r.size, r.size],
                interpolation=_INTERPOLATION[r.interpolation],
                antialias=True,
            )
            out.append(crop.flip(-1) if flip else crop)
        return torch.stack(out)

    def __call__(
        self,
        data: Sequence[Tensor],
        generator: torch.Generator | None = None,
        paths: Sequence[str] = (),
    ) -> Tensor:
        images = decode_batch(data, self.device, paths, self.on_corrupt)
        img_bchw = normalize_uint8(self.crops(images, generator), self.mean, self.std)
        if self._erase is not None:
            img_bchw = self._random_erase(img_bchw, generator)
        return img_bchw

    def _random_erase(self, img_bchw: Tensor, generator: torch.Generator | None) -> Tensor:
        """timm RandomErasing per image; its box draws (Python ``random``) are seeded from
        ``generator``, its pixel noise comes from the device's default generator."""
        import random

        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        state = random.getstate()
        random.seed(seed)
        try:
            self._erase.device = img_bchw.device
            self._erase(img_bchw)  # per image, in place; noise from the device's default RNG
        finally:
            random.setstate(state)
        return img_bchw


class DevicePrefetcher:
    """Iterates ``prepare(item)`` for the items of ``items``, preparing item ``k + 1`` while the
    caller works on item ``k``: on CUDA on a side stream (the training stream waits for it
    through an event), so decoding and cropping the next batch overlap the current step; on
    the CPU simply in order.

    Args:
        items: e.g. a DataLoader iterator of encoded batches.
        prepare: item -> tensor or tuple / list / dict of tensors on ``device``.
        device: the training device.
    """

    def __init__(
        self, items: Iterable[Any], prepare: Callable[[Any], Any], device: torch.device | str
    ) -> None:
        self.items, self.prepare, self.device = items, prepare, torch.device(device)

    def __iter__(self) -> Iterator[Any]:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        source = iter(self.items)

        def launch() -> tuple[Any, Any] | None:
            try:
                item = next(source)
            except StopIteration:
                return None
            if stream is None:
                return self.prepare(item), None
            with torch.cuda.stream(stream):
                out = self.prepare(item)
                done = torch.cuda.Event()
                done.record(stream)
            return out, done

        upcoming = launch()
        while upcoming is not None:
            out, done = upcoming
            upcoming = launch()  # the next batch's work is queued before this one is used
            if done is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(done)
                for tensor in _tensors(out):  # memory made on the side stream, used here
                    tensor.record_stream(current)
            yield out


def _tensors(out: Any) -> Iterator[Tensor]:
    if isinstance(out, Tensor):
        yield out
    elif isinstance(out, list | tuple):
        for part in out:
            yield from _tensors(part)
    elif isinstance(out, dict):
        for part in out.values():
            yield from _tensors(part)

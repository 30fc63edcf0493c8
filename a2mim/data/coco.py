"""COCO-format instance segmentation: a validated dataset and a pycocotools evaluator.

`CocoInstances` reads a COCO ``instances_*.json`` file, checks it once at construction (so a
malformed file fails before training starts, with the file named in the message) and yields
``(img_chw, target)`` pairs in the layout torchvision's detection models expect:

- ``img_chw``: float32 tensor (3, H, W) in [0, 1];
- ``target["boxes"]``: float32 (N, 4), ``x1, y1, x2, y2`` in pixels (COCO ``xywh`` converted);
- ``target["labels"]``: int64 (N,), contiguous ``1..K``; ``dataset.cat_ids[label - 1]`` is the
  COCO category id (0 stays free for the detector's background class);
- ``target["masks"]``: uint8 (N, H, W), decoded from polygons, compressed or uncompressed RLE;
- ``target["iscrowd"]``: int64 (N,); crowd regions are kept, `drop_crowd` removes them;
- ``target["area"]``: float32 (N,), the annotation's ``area`` field;
- ``target["image_id"]``: the COCO image id (int).
- ``target["polygons"]`` (only with ``with_polygons=True``): per instance, its polygons as
  float64 arrays ``[x0, y0, x1, y1, ...]``, or None for an RLE segmentation (detectron2 trains
  its mask head from polygons when every instance has them). Then ``masks`` is left out (not
  decoded) when every non-crowd instance has polygons, as in COCO's training set.

`coco_evaluate` runs pycocotools' ``COCOeval`` and returns AP, AP50 and AP75 in percent.

`validate_root` checks, cheaply and before anything trains, that a folder holds the COCO 2017
layout the ``detect`` stage reads (`COCO2017_LAYOUT`); `clip_boxes` clips boxes to the image and
drops the empty ones as detectron2's loader does (COCO train2017 holds zero-width boxes).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from a2mim.config import ConfigError
from a2mim.data.imagefolder import to_rgb

__all__ = [
    "COCO2017_LAYOUT",
    "CocoFormatError",
    "CocoInstances",
    "CocoLayoutError",
    "clip_boxes",
    "coco_evaluate",
    "count_empty_boxes",
    "drop_crowd",
    "load_coco_json",
    "segmentation_to_mask",
    "segmentation_to_rle",
    "validate_root",
]

Target = dict[str, Any]
Transforms = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]

_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox", "segmentation", "area", "iscrowd")
_CATEGORY_KEYS = ("id", "name")
# Per-instance entries of a target (leading dimension N); `drop_crowd` filters exactly these.
_INSTANCE_KEYS = ("boxes", "labels", "masks", "iscrowd", "area", "polygons")
# Indices into COCOeval.stats for the reported metrics.
_STAT_INDEX = {"AP": 0, "AP50": 1, "AP75": 2}
# The official COCO 2017 layout, relative to the dataset root: the ``detect`` stage's defaults.
COCO2017_LAYOUT = {
    "train_ann": "annotations/instances_train2017.json",
    "train_images": "train2017",
    "val_ann": "annotations/instances_val2017.json",
    "val_images": "val2017",
}
# detectron2 ``filter_empty_instances``: a box is empty when its width or height is <= this.
EMPTY_BOX_THRESHOLD = 1e-5


class CocoFormatError(ValueError):
    """A COCO annotation file (named in the message) breaks the format."""


def load_coco_json(ann_file: str | Path) -> dict[str, Any]:
    """Read a COCO annotation file; a syntax error names the file and the position."""
    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CocoFormatError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno} "
            f"(character {err.pos}): {err.msg}. Fix or regenerate the file."
        ) from err
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    return data


def _is_valid_polygon(polygon: list[Any]) -> bool:
    """At least 3 (x, y) pairs; the official COCO files hold a few shorter ones."""
    return len(polygon) >= 6 and len(polygon) % 2 == 0


def _polygons(segmentation: Any) -> list[np.ndarray] | None:
    """The usable polygons of a segmentation as float64 arrays, None for RLE."""
    if not isinstance(segmentation, list):
        return None
    return [np.asarray(p, dtype=np.float64) for p in segmentation if _is_valid_polygon(p)]


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """Convert any COCO segmentation (polygons, compressed or uncompressed RLE) to one
    compressed RLE dict covering an image of ``height`` x ``width`` pixels."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if _is_valid_polygon(p)]
        if not polygons:
            raise ValueError("segmentation has no polygon with at least 3 (x, y) points")
        # frPyObjects would read a 4-number list as a box: only real polygons reach it.
        rles = mask_utils.frPyObjects(polygons, height, width)
        return mask_utils.merge(rles)
    if isinstance(segmentation, dict):
        counts = segmentation["counts"]
        if isinstance(counts, list):
            return mask_utils.frPyObjects(segmentation, height, width)
        if isinstance(counts, str):
            return {"size": list(segmentation["size"]), "counts": counts.encode("ascii")}
        return segmentation
    raise TypeError(
        f"segmentation must be a list of polygons or an RLE dict, got {type(segmentation).__name__}"
    )


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation to a binary mask: uint8 array (height, width) of 0/1."""
    rle = segmentation_to_rle(segmentation, height, width)
    with warnings.catch_warnings():
        # pycocotools' Cython decoder trips NumPy 2's `__array__(copy=...)` deprecation; the
        # decoded values are unaffected.
        warnings.filterwarnings("ignore", message=r"__array__ implementation doesn't accept")
        mask_hw = mask_utils.decode(rle)
    return np.ascontiguousarray(mask_hw, dtype=np.uint8)


def drop_crowd(target: Target) -> Target:
    """Return a copy of ``target`` without its crowd instances (``iscrowd == 1``).

    Training losses usually skip crowd regions; evaluation keeps them (COCOeval ignores
    detections matched to crowd regions rather than counting them as false positives).
    """
    return _select(target, target["iscrowd"] == 0)


def _select(target: Target, keep_n: torch.Tensor) -> Target:
    """A copy of ``target`` with the per-instance entries restricted to ``keep_n`` (bool)."""
    kept = dict(target)
    for key in _INSTANCE_KEYS:
        value = kept.get(key)
        if isinstance(value, list):
            kept[key] = [v for v, keep in zip(value, keep_n.tolist(), strict=True) if keep]
        elif value is not None:
            kept[key] = value[keep_n]
    return kept


def clip_boxes(
    target: Target, height: int, width: int, threshold: float = EMPTY_BOX_THRESHOLD
) -> tuple[Target, int]:
    """``(target, dropped)``: the boxes clipped to the ``width x height`` image and the instances
    whose clipped box has width or height ``<= threshold`` removed, as detectron2's loader does
    (``Boxes.clip`` then ``filter_empty_instances``); ``dropped`` counts them. Zero-size boxes
    (COCO train2017 has some) otherwise give non-finite or corrupted box losses."""
    boxes = target["boxes"].clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep_n = ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)
    kept = {**target, "boxes": boxes}
    if bool(keep_n.all()):
        return kept, 0
    return _select(kept, keep_n), int((~keep_n).sum())


def count_empty_boxes(
    coco: COCO, image_ids: Iterable[int], skip_ann_ids: Iterable[int] = ()
) -> dict[str, int]:
    """How many non-crowd annotations of ``image_ids`` `clip_boxes` drops, from the JSON
    alone: ``{"annotations": N checked, "empty_boxes": n dropped, "images_affected": m}``."""
    skipped = set(skip_ann_ids)
    checked = empty = affected = 0
    for image_id in image_ids:
        info = coco.imgs[image_id]
        hit = False
        for ann in coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0) or ann["id"] in skipped:
                continue
            checked += 1
            x, y, w, h = ann["bbox"]
            x1, x2 = min(max(x, 0), info["width"]), min(max(x + w, 0), info["width"])
            y1, y2 = min(max(y, 0), info["height"]), min(max(y + h, 0), info["height"])
            if x2 - x1 <= EMPTY_BOX_THRESHOLD or y2 - y1 <= EMPTY_BOX_THRESHOLD:
                empty += 1
                hit = True
        affected += hit
    return {"annotations": checked, "empty_boxes": empty, "images_affected": affected}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _require_keys(entry: Any, keys: Sequence[str], where: str, ann_file: Path) -> None:
    if not isinstance(entry, dict):
        raise CocoFormatError(f"{ann_file}: {where} must be an object, got {type(entry).__name__}")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise CocoFormatError(
            f"{ann_file}: {where} is missing required key(s) {missing}; "
            f"COCO instance annotations need {list(keys)}"
        )


def _validate_segmentation(
    ann: dict[str, Any], image: dict[str, Any], ann_file: Path, tolerance: float
) -> bool:
    """Check one annotation's segmentation; False when no usable polygon is left."""
    segmentation = ann["segmentation"]
    height, width = image["height"], image["width"]
    where = f"annotation id={ann['id']} (image id={ann['image_id']})"
    if isinstance(segmentation, list):
        usable = False
        for polygon in segmentation:
            if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
                raise CocoFormatError(
                    f"{ann_file}: {where} has a polygon that is not a flat list of numbers "
                    f"[x0, y0, x1, y1, ...]"
                )
            if not _is_valid_polygon(polygon):
                continue  # degenerate (< 3 points): dropped, as detectron2 does
            usable = True
            xs, ys = polygon[0::2], polygon[1::2]
            for axis, values, bound in (("x", xs, width), ("y", ys, height)):
                low, high = min(values), max(values)
                if low < -tolerance or high > bound + tolerance:
                    raise CocoFormatError(
                        f"{ann_file}: {where} has polygon {axis} coordinates in "
                        f"[{low:g}, {high:g}], outside the image bound 0..{bound} "
                        f"(image is {width}x{height}, tolerance {tolerance:g} px)"
                    )
        return usable
    if isinstance(segmentation, dict):
        if "size" not in segmentation or "counts" not in segmentation:
            raise CocoFormatError(f"{ann_file}: {where} RLE needs 'size' and 'counts'")
        if list(segmentation["size"]) != [height, width]:
            raise CocoFormatError(
                f"{ann_file}: {where} RLE size {segmentation['size']} differs from the image "
                f"size [height, width] = {[height, width]}"
            )
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if sum(counts) != height * width or any(c < 0 for c in counts):
                raise CocoFormatError(
                    f"{ann_file}: {where} uncompressed RLE counts sum to {sum(counts)}, "
                    f"expected height*width = {height * width}"
                )
        elif not isinstance(counts, str | bytes):
            raise CocoFormatError(f"{ann_file}: {where} RLE counts must be a list or a string")
        return True
    raise CocoFormatError(
        f"{ann_file}: {where} segmentation must be a polygon list or an RLE dict, "
        f"got {type(segmentation).__name__}"
    )


def _validate_dataset(
    data: dict[str, Any], ann_file: Path, image_root: Path, tolerance: float
) -> list[int]:
    """Check a loaded COCO dict; raise `CocoFormatError` (naming ``ann_file``) on the first
    problem, or `FileNotFoundError` for an image missing under ``image_root``.

    Returns the ids of annotations whose polygons are all degenerate (< 3 points).
    """
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise CocoFormatError(
                f"{ann_file}: missing required top-level key '{key}'; a COCO instances file "
                f"needs 'images', 'annotations' and 'categories'"
            )
        if not isinstance(data[key], list):
            raise CocoFormatError(f"{ann_file}: '{key}' must be a list")

    category_ids: set[int] = set()
    for i, category in enumerate(data["categories"]):
        _require_keys(category, _CATEGORY_KEYS, f"categories[{i}]", ann_file)
        if category["id"] in category_ids:
            raise CocoFormatError(f"{ann_file}: category id {category['id']} appears twice")
        category_ids.add(category["id"])

    images: dict[int, dict[str, Any]] = {}
    for i, image in enumerate(data["images"]):
        _require_keys(image, _IMAGE_KEYS, f"images[{i}]", ann_file)
        if image["id"] in images:
            raise CocoFormatError(f"{ann_file}: image id {image['id']} appears twice")
        if (
            not (isinstance(image["height"], int) and isinstance(image["width"], int))
            or min(image["height"], image["width"]) < 1
        ):
            raise CocoFormatError(
                f"{ann_file}: images[{i}] (id={image['id']}) needs positive integer "
                f"height/width, got {image['height']!r}x{image['width']!r}"
            )
        path = image_root / image["file_name"]
        if not path.is_file():
            raise FileNotFoundError(
                f"image file missing: {path} (file_name {image['file_name']!r} of image "
                f"id={image['id']} in {ann_file}); check image_root or the file list"
            )
        images[image["id"]] = image

    annotation_ids: set[int] = set()
    unusable: list[int] = []
    for i, ann in enumerate(data["annotations"]):
        _require_keys(ann, _ANNOTATION_KEYS, f"annotations[{i}]", ann_file)
        if ann["id"] in annotation_ids:
            raise CocoFormatError(f"{ann_file}: annotation id {ann['id']} appears twice")
        annotation_ids.add(ann["id"])
        if ann["image_id"] not in images:
            raise CocoFormatError(
                f"{ann_file}: annotation id={ann['id']} refers to image id={ann['image_id']}, "
                f"which is not in 'images'"
            )
        if ann["category_id"] not in category_ids:
            raise CocoFormatError(
                f"{ann_file}: annotation id={ann['id']} (image id={ann['image_id']}) has "
                f"category_id={ann['category_id']}, which is not in 'categories' "
                f"(ids {sorted(category_ids)})"
            )
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise CocoFormatError(
                f"{ann_file}: annotation id={ann['id']} bbox must be 4 numbers [x, y, w, h], "
                f"got {bbox!r}"
            )
        if bbox[2] < 0 or bbox[3] < 0:
            raise CocoFormatError(
                f"{ann_file}: annotation id={ann['id']} bbox has negative size {bbox!r}"
            )
        if ann["iscrowd"] not in (0, 1):
            raise CocoFormatError(
                f"{ann_file}: annotation id={ann['id']} iscrowd must be 0 or 1, "
                f"got {ann['iscrowd']!r}"
            )
        if not _validate_segmentation(ann, images[ann["image_id"]], ann_file, tolerance):
            unusable.append(ann["id"])
    return unusable


def _coco_from_dict(data: dict[str, Any]) -> COCO:
    """Build a pycocotools COCO index from an in-memory dict without its console chatter."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoInstances(torch.utils.data.Dataset):
    """COCO instance-segmentation dataset (boxes, labels, masks), validated at construction.

    Args:
        ann_file: COCO ``instances_*.json``.
        image_root: folder that ``images[*].file_name`` is relative to.
        transforms: optional ``f(img_chw, target) -> (img_chw, target)`` applied last.
        polygon_tolerance: how far (pixels) polygon vertices may lie outside the image
            before the file is rejected; COCO coordinates run over ``[0, width] x [0, height]``.
        with_polygons: also give each target its ``polygons`` (see the module docstring).

    Degenerate polygons (fewer than 3 points, present in the official COCO files) are
    dropped as detectron2 does; an annotation left without any polygon is kept in
    ``self.coco`` (for evaluation) but left out of the targets, with a warning, and its id
    is listed in ``self.skipped_ann_ids``.

    Items are ``(img_chw, target)``; see the module docstring for the target layout. Images
    are ordered by COCO image id; ``self.ids[index]`` is the image id of item ``index``.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_root: str | Path,
        transforms: Transforms | None = None,
        polygon_tolerance: float = 1.0,
        with_polygons: bool = False,
    ) -> None:
        self.with_polygons = with_polygons
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise FileNotFoundError(
                f"image_root is not a folder: {self.image_root} (for {self.ann_file})"
            )
        data = load_coco_json(self.ann_file)
        self.skipped_ann_ids = _validate_dataset(
            data, self.ann_file, self.image_root, polygon_tolerance
        )
        if self.skipped_ann_ids:
            warnings.warn(
                f"{self.ann_file}: {len(self.skipped_ann_ids)} annotation(s) have only "
                f"degenerate polygons (< 3 points) and are left out of the targets (kept for "
                f"evaluation); ids {self.skipped_ann_ids[:10]}",
                stacklevel=2,
            )
        self.coco = _coco_from_dict(data)
        self.transforms = transforms
        self.ids: list[int] = sorted(self.coco.imgs)
        self.cat_ids: list[int] = sorted(self.coco.cats)
        self.cat_id_to_label: dict[int, int] = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.class_names: list[str] = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self._skipped = frozenset(self.skipped_ann_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def label_to_cat_id(self, label: int) -> int:
        """COCO category id of a contiguous label in ``1..K``."""
        if not 1 <= label <= len(self.cat_ids):
            raise ValueError(f"label {label} outside 1..{len(self.cat_ids)}")
        return self.cat_ids[label - 1]

    def load_image(self, image_id: int) -> torch.Tensor:
        """Image ``image_id`` as float32 (3, H, W) in [0, 1]; its size must match the JSON."""
        info = self.coco.imgs[image_id]
        path = self.image_root / info["file_name"]
        with Image.open(path) as image:
            rgb_hwc = np.asarray(to_rgb(image))  # 16-bit grayscale: round(v / 257), not 0/255
        height, width = rgb_hwc.shape[:2]
        if (height, width) != (info["height"], info["width"]):
            raise CocoFormatError(
                f"{path}: image is {width}x{height} (WxH) but {self.ann_file} declares "
                f"{info['width']}x{info['height']} for image id={image_id}"
            )
        return torch.from_numpy(rgb_hwc.copy()).permute(2, 0, 1).float().div_(255.0)

    def load_target(self, image_id: int) -> Target:
        """Annotations of ``image_id`` as tensors (see module docstring); N may be 0."""
        info = self.coco.imgs[image_id]
        height, width = info["height"], info["width"]
        skipped = self._skipped
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if a["id"] not in skipped]
        boxes_n4 = torch.tensor(
            [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
            dtype=torch.float32,
        ).reshape(-1, 4)
        polygons = [_polygons(a["segmentation"]) for a in anns] if self.with_polygons else None
        target: Target = {
            "boxes": boxes_n4,
            "labels": torch.tensor(
                [self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64
            ),
            "iscrowd": torch.tensor([int(a["iscrowd"]) for a in anns], dtype=torch.int64),
            "area": torch.tensor([float(a["area"]) for a in anns], dtype=torch.float32),
            "image_id": int(image_id),
        }
        bitmaps_needed = polygons is None or any(
            p is None and not a["iscrowd"] for p, a in zip(polygons, anns, strict=True)
        )
        if bitmaps_needed:
            masks_nhw = np.zeros((len(anns), height, width), dtype=np.uint8)
            for i, ann in enumerate(anns):
                masks_nhw[i] = segmentation_to_mask(ann["segmentation"], height, width)
            target["masks"] = torch.from_numpy(masks_nhw)
        if polygons is not None:
            target["polygons"] = polygons
        return target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image_id = self.ids[index]
        img_chw = self.load_image(image_id)
        target = self.load_target(image_id)
        if self.transforms is not None:
            img_chw, target = self.transforms(img_chw, target)
        return img_chw, target


class CocoLayoutError(ConfigError):
    """A dataset root does not hold the COCO layout the ``detect`` stage reads."""


def _layout_text(root: Path, paths: Mapping[str, str]) -> str:
    return (
        f"expected the COCO 2017 layout under {root}: {paths['train_ann']}, {paths['val_ann']}, "
        f"{paths['train_images']}/ and {paths['val_images']}/ (images named by the JSON's "
        f"file_name); point data.root at that folder"
    )


def validate_root(
    root: str | Path,
    train_ann: str = COCO2017_LAYOUT["train_ann"],
    train_images: str = COCO2017_LAYOUT["train_images"],
    val_ann: str = COCO2017_LAYOUT["val_ann"],
    val_images: str = COCO2017_LAYOUT["val_images"],
) -> dict[str, Any]:
    """Check, cheaply, that ``root`` holds a COCO instance set in the given layout (default:
    COCO 2017, `COCO2017_LAYOUT`) before anything is trained or submitted.

    Checks that both annotation files and image folders exist; reads the validation JSON
    (25 MB for COCO 2017; the 450 MB training file is only checked to be a non-empty file)
    and checks that its first image exists under ``val_images`` with the size the JSON declares
    and that its annotations name known categories. Raises `CocoLayoutError` naming the
    expected layout; returns ``{"root", "val_images", "val_annotations", "categories"}``.
    """
    root = Path(root)
    paths = {
        "train_ann": train_ann,
        "train_images": train_images,
        "val_ann": val_ann,
        "val_images": val_images,
    }
    layout = _layout_text(root, paths)
    if not root.is_dir():
        raise CocoLayoutError(f"COCO root {root} is not a folder; {layout}")
    missing = [
        rel
        for key, rel in paths.items()
        if not ((root / rel).is_file() if key.endswith("_ann") else (root / rel).is_dir())
    ]
    if missing:
        raise CocoLayoutError(f"{root}: missing {', '.join(missing)}; {layout}")
    if (root / train_ann).stat().st_size == 0:
        raise CocoLayoutError(f"{root / train_ann} is empty; {layout}")
    try:
        data = load_coco_json(root / val_ann)
    except CocoFormatError as err:
        raise CocoLayoutError(str(err)) from err
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise CocoLayoutError(
                f"{root / val_ann}: no '{key}' list; a COCO instances file needs 'images', "
                f"'annotations' and 'categories'"
            )
    if not data["images"]:
        raise CocoLayoutError(f"{root / val_ann} lists no images; {layout}")
    first = data["images"][0]
    _require_keys(first, _IMAGE_KEYS, "images[0]", root / val_ann)
    image_path = root / val_images / first["file_name"]
    if not image_path.is_file():
        raise CocoLayoutError(
            f"{root / val_ann}: its first image {first['file_name']!r} is not in "
            f"{root / val_images}; {layout}"
        )
    with Image.open(image_path) as image:
        size = image.size
    if size != (first["width"], first["height"]):
        raise CocoLayoutError(
            f"{image_path} is {size[0]}x{size[1]} (WxH) but {root / val_ann} declares "
            f"{first['width']}x{first['height']}: the images and annotations do not belong "
            f"together"
        )
    categories = {c.get("id") for c in data["categories"] if isinstance(c, dict)}
    for ann in data["annotations"]:
        sample = isinstance(ann, dict) and ann.get("image_id") == first["id"]
        if sample and ann.get("category_id") not in categories:
            raise CocoLayoutError(
                f"{root / val_ann}: annotation id={ann.get('id')} has category_id="
                f"{ann.get('category_id')!r}, not one of the file's categories"
            )
    return {
        "root": str(root),
        "val_images": len(data["images"]),
        "val_annotations": len(data["annotations"]),
        "categories": len(categories),
    }


def _as_coco(coco_gt: COCO | CocoInstances | str | Path) -> COCO:
    if isinstance(coco_gt, CocoInstances):
        coco = coco_gt.coco
    elif isinstance(coco_gt, COCO):
        coco = coco_gt
    else:
        coco = _coco_from_dict(load_coco_json(coco_gt))
    if coco.anns and min(coco.anns) < 1:
        # COCOeval records "matched to ground-truth annotation <id>" and treats id 0 as "no
        # match", so a true positive on annotation 0 would count as a false positive. Files
        # with 0-based ids exist (labelme's labelme2coco writes them): renumber a copy.
        data = copy.deepcopy(coco.dataset)
        for new_id, ann in enumerate(sorted(data["annotations"], key=lambda a: a["id"]), 1):
            ann["id"] = new_id
        coco = _coco_from_dict(data)
    return coco


def _check_detections(coco: COCO, detections: Sequence[Mapping[str, Any]]) -> None:
    for i, det in enumerate(detections):
        for key in ("image_id", "category_id", "score"):
            if key not in det:
                raise ValueError(f"detections[{i}] lacks '{key}'")
        if det["image_id"] not in coco.imgs:
            raise ValueError(
                f"detections[{i}] has image_id={det['image_id']}, which is not in the ground truth"
            )
        if det["category_id"] not in coco.cats:
            raise ValueError(
                f"detections[{i}] has category_id={det['category_id']}, which is not a "
                f"ground-truth category (COCO ids {sorted(coco.cats)}); map contiguous labels "
                f"back with CocoInstances.cat_ids"
            )


def _results_for(
    coco: COCO, detections: Sequence[Mapping[str, Any]], iou_type: str
) -> list[dict[str, Any]]:
    """Copy detections into the form `COCO.loadRes` needs for one IoU type."""
    results = []
    for i, det in enumerate(detections):
        result = {
            "image_id": det["image_id"],
            "category_id": det["category_id"],
            "score": float(det["score"]),
        }
        if iou_type == "bbox":
            if "bbox" not in det:
                raise ValueError(f"detections[{i}] lacks 'bbox' (x, y, w, h) for bbox evaluation")
            result["bbox"] = [float(v) for v in det["bbox"]]
        else:
            if "segmentation" not in det:
                raise ValueError(
                    f"detections[{i}] lacks 'segmentation' (an RLE dict) for segm evaluation"
                )
            info = coco.imgs[det["image_id"]]
            # Without 'bbox', loadRes takes area and box from the mask, as COCO does for segm.
            result["segmentation"] = segmentation_to_rle(
                copy.deepcopy(det["segmentation"]), info["height"], info["width"]
            )
        results.append(result)
    return results


def coco_evaluate(
    coco_gt: COCO | CocoInstances | str | Path,
    detections: Sequence[Mapping[str, Any]],
    iou_types: Iterable[str] = ("bbox", "segm"),
    evaluators: dict[str, COCOeval] | None = None,
) -> dict[str, float]:
    """Evaluate detections with pycocotools' COCOeval.

    Args:
        coco_gt: ground truth as a pycocotools ``COCO``, a `CocoInstances` or a JSON path.
        detections: one dict per detection with ``image_id``, ``category_id`` (COCO id, not
            the contiguous label), ``score``, ``bbox`` ``[x, y, w, h]`` (for "bbox") and
            ``segmentation`` (for "segm": an RLE dict, compressed or not, or polygons).
        iou_types: any of "bbox", "segm".
        evaluators: when given, receives the ``COCOeval`` of each IoU type that ran (its
            per-image matches are what :mod:`a2mim.predictions` stores).

    Returns:
        ``{"bbox/AP": .., "bbox/AP50": .., "bbox/AP75": .., "segm/AP": ..}`` in percent
        (0..100). With no detections every AP is 0.0; when the ground truth has no
        (non-crowd) instance at all, AP is undefined and reported as NaN.
    """
    coco = _as_coco(coco_gt)
    iou_types = tuple(iou_types)
    unknown = set(iou_types) - {"bbox", "segm"}
    if unknown:
        raise ValueError(f"unknown iou_types {sorted(unknown)}; use 'bbox' and/or 'segm'")
    _check_detections(coco, detections)
    has_ground_truth = any(not a.get("iscrowd", 0) for a in coco.anns.values())

    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        if not has_ground_truth:
            stats = {name: float("nan") for name in _STAT_INDEX}
        elif not detections:
            stats = dict.fromkeys(_STAT_INDEX, 0.0)
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                coco_dt = coco.loadRes(_results_for(coco, detections, iou_type))
                evaluator = COCOeval(coco, coco_dt, iouType=iou_type)
                evaluator.evaluate()
                evaluator.accumulate()
                evaluator.summarize()
            if evaluators is not None:
                evaluators[iou_type] = evaluator
            # COCOeval writes -1 where a metric is undefined; with ground truth present and
            # detections given, AP/AP50/AP75 are defined, so -1 cannot occur here.
            stats = {
                name: 100.0 * float(evaluator.stats[index]) for name, index in _STAT_INDEX.items()
            }
        for name, value in stats.items():
            metrics[f"{iou_type}/{name}"] = value
    return metrics

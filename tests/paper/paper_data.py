"""Format-faithful data at paper geometry, written with real encoders (PIL JPEG / PNG).

Three datasets, each in the exact on-disk layout of the release the paper used, with images of
the release's geometry (content: crops of scikit-image's sample photos with drawn objects):

* ImageNet (ImageFolder): ``train/<wnid>/<wnid>_<n>.JPEG`` and ``val/<wnid>/...``, RGB JPEGs
  whose sides are drawn from 300-500 px (ImageNet's typical 500x375 / 375x500 range).
* COCO 2017: ``train2017/``, ``val2017/`` (``000000xxxxxx.jpg``, 640x480 or 480x640) and
  ``annotations/instances_{train,val}2017.json`` with COCO's 80 categories and their
  non-contiguous ids (1..90), ``info``/``licenses``/``images``/``annotations``/``categories``;
  objects have polygon segmentations (``iscrowd: 0``, a list of ``[x1, y1, ...]`` rings), crowd
  regions an uncompressed RLE (``iscrowd: 1``, ``{"counts": [...], "size": [h, w]}``), as COCO
  stores them. Train annotations include one degenerate box (zero width), as train2017 has.
* ADE20K: ``ADEChallengeData2016/images/{training,validation}/ADE_<split>_<n>.jpg`` and
  ``annotations/{training,validation}/ADE_<split>_<n>.png`` (mode L) at ~512 px short side;
  label 0 = not annotated (ignored), 1..150 the classes.

Everything depends only on the seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from a2mim.data.scenes import load_backgrounds, mask_to_polygons

# COCO 2017's 80 categories: (id, name, supercategory); ids 12, 26, 29, 30, 45, 66, 68, 69, 71,
# 83 are unused, as in the release.
COCO_CATEGORIES = [
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"),
    (4, "motorcycle", "vehicle"), (5, "airplane", "vehicle"), (6, "bus", "vehicle"),
    (7, "train", "vehicle"), (8, "truck", "vehicle"), (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"), (14, "parking meter", "outdoor"), (15, "bench", "outdoor"),
    (16, "bird", "animal"), (17, "cat", "animal"), (18, "dog", "animal"),
    (19, "horse", "animal"), (20, "sheep", "animal"), (21, "cow", "animal"),
    (22, "elephant", "animal"), (23, "bear", "animal"), (24, "zebra", "animal"),
    (25, "giraffe", "animal"), (27, "backpack", "accessory"), (28, "umbrella", "accessory"),
    (31, "handbag", "accessory"), (32, "tie", "accessory"), (33, "suitcase", "accessory"),
    (34, "frisbee", "sports"), (35, "skis", "sports"), (36, "snowboard", "sports"),
    (37, "sports ball", "sports"), (38, "kite", "sports"), (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"), (41, "skateboard", "sports"),
    (42, "surfboard", "sports"), (43, "tennis racket", "sports"), (44, "bottle", "kitchen"),
    (46, "wine glass", "kitchen"), (47, "cup", "kitchen"), (48, "fork", "kitchen"),
    (49, "knife", "kitchen"), (50, "spoon", "kitchen"), (51, "bowl", "kitchen"),
    (52, "banana", "food"), (53, "apple", "food"), (54, "sandwich", "food"),
    (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"),
    (58, "hot dog", "food"), (59, "pizza", "food"), (60, "donut", "food"),
    (61, "cake", "food"), (62, "chair", "furniture"), (63, "couch", "furniture"),
    (64, "potted plant", "furniture"), (65, "bed", "furniture"),
    (67, "dining table", "furniture"), (70, "toilet", "furniture"), (72, "tv", "electronic"),
    (73, "laptop", "electronic"), (74, "mouse", "electronic"), (75, "remote", "electronic"),
    (76, "keyboard", "electronic"), (77, "cell phone", "electronic"),
    (78, "microwave", "appliance"), (79, "oven", "appliance"), (80, "toaster", "appliance"),
    (81, "sink", "appliance"), (82, "refrigerator", "appliance"), (84, "book", "indoor"),
    (85, "clock", "indoor"), (86, "vase", "indoor"), (87, "scissors", "indoor"),
    (88, "teddy bear", "indoor"), (89, "hair drier", "indoor"), (90, "toothbrush", "indoor"),
]  # fmt: skip
ADE_NUM_CLASSES = 150


def _photo(rng: np.random.Generator, photos: list[np.ndarray], width: int, height: int):
    """A random crop of a sample photo resized to ``width x height`` (PIL image, RGB)."""
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    ch = int(rng.integers(h // 2, h + 1))
    cw = int(rng.integers(w // 2, w + 1))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(photo[y : y + ch, x : x + cw])
    return crop.resize((width, height), Image.Resampling.BILINEAR)


def _blob(rng: np.random.Generator, width: int, height: int, min_side: int) -> np.ndarray:
    """A bool mask ``(height, width)`` of one random convex-ish polygon object."""
    w = int(rng.integers(min_side, max(min_side + 1, width // 3)))
    h = int(rng.integers(min_side, max(min_side + 1, height // 3)))
    x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(5, 10))))
    radius = rng.uniform(0.6, 1.0, size=angles.size)
    xs = x0 + w / 2 * (1 + radius * np.cos(angles))
    ys = y0 + h / 2 * (1 + radius * np.sin(angles))
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=1)
    return np.asarray(canvas, dtype=bool)


def _paint(img: Image.Image, mask_hw: np.ndarray, rng: np.random.Generator) -> None:
    """Paint ``mask_hw`` onto ``img`` in a random colour (alpha 0.7: texture stays visible)."""
    colour = Image.new("RGB", img.size, tuple(int(c) for c in rng.integers(0, 256, size=3)))
    alpha = Image.fromarray((mask_hw * 178).astype(np.uint8))
    img.paste(colour, (0, 0), alpha)


def make_imagenet(
    root: Path, classes: int = 2, train_per_class: int = 1, val_per_class: int = 1, seed: int = 0
) -> Path:
    """ImageNet in ImageFolder layout; returns ``root``."""
    rng = np.random.default_rng([seed, 1])
    photos = load_backgrounds()
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            wnid = f"n{1440764 + 1000 * c:08d}"
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                w, h = (int(v) for v in rng.integers(300, 501, size=2))
                img = _photo(rng, photos, w, h)
                _paint(img, _blob(rng, w, h, 40), rng)
                img.save(folder / f"{wnid}_{i + 1}.JPEG", "JPEG", quality=90)
    return root


def _coco_split(
    root: Path, split: str, n_images: int, first_id: int, rng, photos, degenerate: bool
) -> None:
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = 1000 * first_id
    for k in range(n_images):
        image_id = first_id + k
        width, height = (640, 480) if k % 2 == 0 else (480, 640)
        img = _photo(rng, photos, width, height)
        name = f"{image_id:012d}.jpg"
        for j in range(int(rng.integers(2, 5))):
            mask = _blob(rng, width, height, 24)
            _paint(img, mask, rng)
            ann_id += 1
            crowd = j == 0 and k == 0  # one crowd region, RLE-coded as COCO stores them
            ys, xs = np.nonzero(mask)
            x, y = float(xs.min()), float(ys.min())
            bbox = [x, y, float(xs.max()) + 1 - x, float(ys.max()) + 1 - y]
            if crowd:
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                segmentation = {"counts": _uncompressed_counts(mask), "size": rle["size"]}
            else:
                segmentation = mask_to_polygons(mask)
            category = COCO_CATEGORIES[int(rng.integers(len(COCO_CATEGORIES)))][0]
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": category,
                    "segmentation": segmentation,
                    "area": float(mask.sum()),
                    "bbox": bbox,
                    "iscrowd": int(crowd),
                }
            )
        if degenerate and k == 0:  # train2017 holds boxes of zero width or height
            ann_id += 1
            x, y = 100.0, 120.0
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": [[x, y, x, y + 10.0, x, y + 20.0]],
                    "area": 0.0,
                    "bbox": [x, y, 0.0, 20.0],
                    "iscrowd": 0,
                }
            )
        img.save(folder / name, "JPEG", quality=90)
        images.append(
            {
                "id": image_id,
                "file_name": name,
                "height": height,
                "width": width,
                "license": 1,
                "coco_url": f"http://images.cocodataset.org/{split}2017/{name}",
                "date_captured": "2013-11-14 17:02:52",
                "flickr_url": "",
            }
        )
    data = {
        "info": {"description": "COCO 2017 Dataset (paper-geometry test data)", "version": "1.0",
                 "year": 2017, "contributor": "COCO Consortium", "url": "http://cocodataset.org",
                 "date_created": "2017/09/01"},
        "licenses": [{"id": 1, "name": "Attribution License",
                      "url": "http://creativecommons.org/licenses/by/2.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": s} for i, n, s in COCO_CATEGORIES],
    }  # fmt: skip
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))


def _uncompressed_counts(mask_hw: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts (column-major runs, starting with zeros)."""
    flat = mask_hw.astype(np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return runs if flat[0] == 0 else [0, *runs]


def make_coco(root: Path, n_train: int = 2, n_val: int = 1, seed: int = 0) -> Path:
    """COCO 2017 layout; returns ``root``."""
    rng = np.random.default_rng([seed, 2])
    photos = load_backgrounds()
    _coco_split(root, "train", n_train, 1, rng, photos, degenerate=True)
    _coco_split(root, "val", n_val, 500000, rng, photos, degenerate=False)
    return root


def make_ade20k(root: Path, n_train: int = 2, n_val: int = 1, seed: int = 0) -> Path:
    """ADE20K (ADEChallengeData2016) layout; returns ``root`` (the ADEChallengeData2016 folder)."""
    rng = np.random.default_rng([seed, 3])
    photos = load_backgrounds()
    for split, stem, n in (("training", "train", n_train), ("validation", "val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            width, height = (683, 512) if k % 2 == 0 else (512, 512)
            img = _photo(rng, photos, width, height)
            label = np.full((height, width), int(rng.integers(1, ADE_NUM_CLASSES + 1)), np.uint8)
            for _ in range(int(rng.integers(3, 7))):
                mask = _blob(rng, width, height, 32)
                _paint(img, mask, rng)
                label[mask] = int(rng.integers(1, ADE_NUM_CLASSES + 1))
            edge = np.zeros_like(label, dtype=bool)  # 0 = not annotated: region borders
            edge[:, 1:] |= label[:, 1:] != label[:, :-1]
            edge[1:, :] |= label[1:, :] != label[:-1, :]
            label[edge] = 0
            name = f"ADE_{stem}_{k + 1:08d}"
            img.save(root / "images" / split / f"{name}.jpg", "JPEG", quality=90)
            Image.fromarray(label, mode="L").save(root / "annotations" / split / f"{name}.png")
    return root

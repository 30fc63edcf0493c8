"""Toy-scale scenes: real Fashion-MNIST objects pasted onto real photos, in COCO and ADE form.

Each scene is a crop of one of scikit-image's sample photos (`BACKGROUND_PHOTOS`, resized to
``img_size``) with 1-3 Fashion-MNIST items pasted on it. An item is upscaled (bilinear, by a
random factor in ``scale``), its silhouette is ``pixel > SILHOUETTE_THRESHOLD`` after removing
specks and pin holes, and exactly the silhouette pixels are pasted (gray value times a random
color tint). Items never touch (at least two pixels apart), so each instance mask is exactly
its silhouette and nothing is occluded.

`make_scenes` writes, atomically (temp folder, then rename)::

    out_dir/manifest.json
    out_dir/coco/{train2017,val2017}/<id>.png                    lossless, so masks are exact
    out_dir/coco/annotations/instances_{train2017,val2017}.json  categories 1..10
    out_dir/ade/images/{training,validation}/<id>.jpg
    out_dir/ade/annotations/{training,validation}/<id>.png   mode L

``out_dir/coco`` is a COCO 2017 root and ``out_dir/ade`` an ADE20K root: each works as the
``data.root`` of its stage with no other key (`a2mim.data.coco.validate_root`,
`a2mim.data.ade.validate_root`).

COCO categories are the 10 Fashion-MNIST classes with ids 1..10 (``class index + 1``); every
annotation has iscrowd=0, ``bbox``/``area`` computed from the mask, and a segmentation in
``mask_format``: "polygon" (the COCO convention for iscrowd=0; contours from
`skimage.measure.find_contours` with holes kept by keyhole bridges, see `mask_to_polygons`) or
"rle" (compressed RLE). Both decode to the exact mask.

ADE label values (decision): ``0`` = unlabeled, used only for a `void_border`-pixel band just
outside every object (ADE20K's 0 is likewise "not annotated"); ``1`` = background photo (real
ADE20K labels "stuff" such as wall or sky as classes, so the background is a class here);
``2..11`` = Fashion-MNIST classes 0..9. Load with ``ADE20KSegmentation(reduce_zero_label=True,
num_classes=11)``: the band becomes 255 (ignored), background 0, Fashion-MNIST class c is c+1.

Train scenes draw items from the first `OBJECT_POOL_SIZE` Fashion-MNIST training images, val
scenes from the first `OBJECT_POOL_SIZE` test images; both splits crop the same photos. Scene
``i`` of a split depends only on ``(seed, split, i)``, not on how many scenes are made.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage
from skimage import data as skimage_data
from skimage import measure, morphology

__all__ = [
    "ADE_BACKGROUND",
    "ADE_CLASS_OFFSET",
    "ADE_NUM_CLASSES",
    "ADE_UNLABELED",
    "BACKGROUND_PHOTOS",
    "FASHION_MNIST_CLASSES",
    "Scene",
    "SceneComposer",
    "load_backgrounds",
    "make_scenes",
    "mask_to_polygons",
    "scene_rng",
    "semantic_label",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Real photographs bundled with scikit-image (no download needed); gray ones become RGB.
BACKGROUND_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
    "coins",
    "grass",
    "gravel",
    "brick",
    "moon",
)
DEFAULT_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
OBJECT_POOL_SIZE = 10_000
SILHOUETTE_THRESHOLD = 32  # on the upscaled uint8 item
MIN_OBJECT_AREA = 40  # pixels; fainter items are redrawn
PLACEMENT_TRIES = 30
OBJECT_GAP = 2  # pixels kept free between two objects

ADE_UNLABELED = 0
ADE_BACKGROUND = 1
ADE_CLASS_OFFSET = 2
ADE_NUM_CLASSES = 1 + len(FASHION_MNIST_CLASSES)  # after reduce_zero_label

SPLITS = {"train": 0, "val": 1}
_ADE_SPLIT = {"train": "training", "val": "validation"}
_FMNIST_PREFIX = {"train": "train", "val": "t10k"}
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_idx(path: Path, ndim: int, max_items: int | None = None) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format): array (N, ...) of its dtype.

    Only the first ``max_items`` items are decompressed when given. Raises ValueError naming
    the file on a bad magic number, an unexpected rank or truncated data.
    """
    with gzip.open(path, "rb") as stream:
        magic = stream.read(4)
        if len(magic) != 4 or magic[:2] != b"\x00\x00" or magic[2] not in _IDX_DTYPES:
            raise ValueError(
                f"{path}: not an IDX file (magic bytes {magic.hex()}; expected 0000 + dtype "
                f"code + rank)"
            )
        if magic[3] != ndim:
            raise ValueError(f"{path}: IDX rank is {magic[3]}, expected {ndim}")
        dtype = _IDX_DTYPES[magic[2]]
        shape = [int.from_bytes(stream.read(4), "big") for _ in range(ndim)]
        if max_items is not None:
            shape[0] = min(shape[0], max_items)
        count = int(np.prod(shape))
        payload = stream.read(count * dtype.itemsize)
    if len(payload) != count * dtype.itemsize:
        raise ValueError(
            f"{path}: truncated IDX data ({len(payload)} bytes, expected "
            f"{count * dtype.itemsize} for shape {shape})"
        )
    return np.frombuffer(payload, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _load_fashion_mnist(fmnist_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """First `OBJECT_POOL_SIZE` items: images uint8 (N, 28, 28), labels int64 (N,)."""
    prefix = _FMNIST_PREFIX[split]
    image_path = fmnist_dir / f"{prefix}-images-idx3-ubyte.gz"
    label_path = fmnist_dir / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (image_path, label_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file missing: {path}; pass fmnist_dir= the folder holding "
                f"the four *-ubyte.gz files"
            )
    images_nhw = _read_idx(image_path, ndim=3, max_items=OBJECT_POOL_SIZE)
    labels_n = _read_idx(label_path, ndim=1, max_items=OBJECT_POOL_SIZE).astype(np.int64)
    if images_nhw.shape[1:] != (28, 28) or len(images_nhw) != len(labels_n):
        raise ValueError(
            f"{image_path}: expected (N, 28, 28) images matching {len(labels_n)} labels, "
            f"got {images_nhw.shape}"
        )
    if labels_n.min() < 0 or labels_n.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{label_path}: labels outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
    return images_nhw, labels_n


def load_backgrounds(names: Sequence[str] = BACKGROUND_PHOTOS) -> list[np.ndarray]:
    """scikit-image sample photos as uint8 RGB arrays (H, W, 3)."""
    photos = []
    for name in names:
        photo = np.asarray(getattr(skimage_data, name)())
        if photo.ndim == 2:
            photo = np.repeat(photo[:, :, None], 3, axis=2)
        photos.append(np.ascontiguousarray(photo[:, :, :3], dtype=np.uint8))
    return photos


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of scene ``index`` of ``split``; it depends on nothing else."""
    return np.random.default_rng([seed, SPLITS[split], index])


@dataclass(frozen=True)
class Scene:
    """One composed scene.

    Attributes:
        image_hwc: uint8 (S, S, 3), the composite.
        background_hwc: uint8 (S, S, 3), the photo crop before pasting.
        masks_nhw: bool (N, S, S), one exact, non-overlapping silhouette per object.
        classes_n: int64 (N,), Fashion-MNIST class indices 0..9.
        sources_n: int64 (N,), index of each object in its Fashion-MNIST pool.
    """

    image_hwc: np.ndarray
    background_hwc: np.ndarray
    masks_nhw: np.ndarray
    classes_n: np.ndarray
    sources_n: np.ndarray


class SceneComposer:
    """Composes scenes from a pool of Fashion-MNIST items and a list of photos.

    Args:
        items_nhw: uint8 (N, 28, 28) Fashion-MNIST images.
        labels_n: int64 (N,) their classes.
        backgrounds: uint8 RGB photos (H, W, 3).
        img_size: side S of the square scenes.
        objects_per_image: inclusive range of objects per scene.
        scale: range of the upscaling factor of the 28x28 items.
    """

    def __init__(
        self,
        items_nhw: np.ndarray,
        labels_n: np.ndarray,
        backgrounds: Sequence[np.ndarray],
        img_size: int = 128,
        objects_per_image: tuple[int, int] = (1, 3),
        scale: tuple[float, float] = (1.5, 2.5),
    ) -> None:
        low, high = objects_per_image
        if not 1 <= low <= high:
            raise ValueError(
                f"objects_per_image must be (low, high) with 1 <= low <= high, "
                f"got {objects_per_image}"
            )
        if not 0 < scale[0] <= scale[1] or round(28 * scale[1]) > img_size:
            raise ValueError(
                f"scale {scale} must be increasing and 28*scale[1] must fit img_size={img_size}"
            )
        self.items_nhw = items_nhw
        self.labels_n = labels_n
        self.backgrounds = list(backgrounds)
        self.img_size = img_size
        self.objects_per_image = (low, high)
        self.scale = scale

    @classmethod
    def from_sources(
        cls,
        split: str,
        img_size: int = 128,
        objects_per_image: tuple[int, int] = (1, 3),
        scale: tuple[float, float] = (1.5, 2.5),
        fmnist_dir: str | Path | None = None,
        backgrounds: Sequence[np.ndarray] | None = None,
    ) -> SceneComposer:
        """The composer `make_scenes` uses for ``split`` ("train" or "val")."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        fmnist_dir = Path(fmnist_dir) if fmnist_dir is not None else DEFAULT_FMNIST_DIR
        items_nhw, labels_n = _load_fashion_mnist(fmnist_dir, split)
        if backgrounds is None:
            backgrounds = load_backgrounds()
        return cls(items_nhw, labels_n, backgrounds, img_size, objects_per_image, scale)

    def background(self, rng: np.random.Generator) -> np.ndarray:
        """A random square crop of a random photo, resized: uint8 (S, S, 3)."""
        photo = self.backgrounds[rng.integers(len(self.backgrounds))]
        height, width = photo.shape[:2]
        side = max(8, round(rng.uniform(0.35, 1.0) * min(height, width)))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crop = Image.fromarray(photo[top : top + side, left : left + side])
        crop = crop.resize((self.img_size, self.img_size), Image.Resampling.BILINEAR)
        crop_hwc = np.asarray(crop)
        if rng.random() < 0.5:
            crop_hwc = crop_hwc[:, ::-1]
        return np.ascontiguousarray(crop_hwc)

    def item(self, rng: np.random.Generator) -> tuple[int, np.ndarray, np.ndarray]:
        """Draw an item: (pool index, gray float (s, s) in [0, 255], silhouette bool (s, s))."""
        while True:
            index = int(rng.integers(len(self.items_nhw)))
            side = round(28 * rng.uniform(*self.scale))
            up = Image.fromarray(self.items_nhw[index]).resize(
                (side, side), Image.Resampling.BILINEAR
            )
            gray_ss = np.asarray(up, dtype=np.float64)
            mask_ss = gray_ss > SILHOUETTE_THRESHOLD
            mask_ss = morphology.remove_small_objects(mask_ss, max_size=4)
            mask_ss = morphology.remove_small_holes(mask_ss, max_size=4)
            if mask_ss.sum() >= MIN_OBJECT_AREA:
                return index, gray_ss, mask_ss

    def compose(self, rng: np.random.Generator) -> Scene:
        """Compose one scene from ``rng``; see `Scene`."""
        size = self.img_size
        background_hwc = self.background(rng)
        image_hwc = background_hwc.copy()
        occupied_hw = np.zeros((size, size), dtype=bool)
        masks, classes, sources = [], [], []
        n_objects = int(rng.integers(self.objects_per_image[0], self.objects_per_image[1] + 1))
        for _ in range(n_objects):
            index, gray_ss, mask_ss = self.item(rng)
            tint_3 = rng.uniform(0.35, 1.0, size=3)
            tint_3[rng.integers(3)] = 1.0  # one saturated channel keeps the color bright
            side = mask_ss.shape[0]
            keep_out_hw = ndimage.binary_dilation(occupied_hw, iterations=OBJECT_GAP)
            for _try in range(PLACEMENT_TRIES):
                top = int(rng.integers(0, size - side + 1))
                left = int(rng.integers(0, size - side + 1))
                window = (slice(top, top + side), slice(left, left + side))
                if not (keep_out_hw[window] & mask_ss).any():
                    break
            else:
                continue  # no free spot: the scene gets fewer objects
            mask_hw = np.zeros((size, size), dtype=bool)
            mask_hw[window] = mask_ss
            shade_ss = 0.3 + 0.7 * gray_ss / 255.0
            object_ss3 = np.rint(255.0 * shade_ss[:, :, None] * tint_3).astype(np.uint8)
            image_hwc[window][mask_ss] = object_ss3[mask_ss]
            occupied_hw |= mask_hw
            masks.append(mask_hw)
            classes.append(int(self.labels_n[index]))
            sources.append(index)
        return Scene(
            image_hwc=image_hwc,
            background_hwc=background_hwc,
            masks_nhw=np.stack(masks) if masks else np.zeros((0, size, size), dtype=bool),
            classes_n=np.asarray(classes, dtype=np.int64),
            sources_n=np.asarray(sources, dtype=np.int64),
        )


def semantic_label(scene: Scene, void_border: int = 1) -> np.ndarray:
    """ADE-style label of a scene: uint8 (S, S); see the module docstring for the values."""
    label_hw = np.full(scene.image_hwc.shape[:2], ADE_BACKGROUND, dtype=np.uint8)
    union_hw = scene.masks_nhw.any(axis=0)
    if void_border > 0 and union_hw.any():
        band_hw = ndimage.binary_dilation(union_hw, iterations=void_border) & ~union_hw
        label_hw[band_hw] = ADE_UNLABELED
    for mask_hw, cls in zip(scene.masks_nhw, scene.classes_n, strict=True):
        label_hw[mask_hw] = ADE_CLASS_OFFSET + cls
    return label_hw


def _signed_area(xy_k2: np.ndarray) -> float:
    x_k, y_k = xy_k2[:, 0], xy_k2[:, 1]
    return 0.5 * float(np.dot(x_k, np.roll(y_k, -1)) - np.dot(y_k, np.roll(x_k, -1)))


def _bridge_hole(ring_k2: np.ndarray, hole_k2: np.ndarray) -> np.ndarray:
    """Splice a hole into an outer ring through a zero-width "keyhole" bridge.

    The ring walks to its vertex nearest the hole, around the hole and back the same way.
    COCO rasterizes polygons with the even-odd rule, under which the doubled bridge edges
    cancel and the hole stays empty.
    """
    dist_rk = np.linalg.norm(ring_k2[:, None, :] - hole_k2[None, :, :], axis=2)
    i, j = np.unravel_index(int(np.argmin(dist_rk)), dist_rk.shape)
    hole_loop = np.concatenate([hole_k2[j:], hole_k2[: j + 1]])
    return np.concatenate([ring_k2[: i + 1], hole_loop, ring_k2[i:]])


def mask_to_polygons(mask_hw: np.ndarray) -> list[list[float]]:
    """COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` whose rasterization is the mask (H, W).

    One polygon per 4-connected component: its outer contour with every hole spliced in by
    a keyhole bridge (`_bridge_hole`), so holes survive COCO's polygon format. Contours come
    from `skimage.measure.find_contours` at level 0.5; pixel (r, c) covers
    ``[c, c+1] x [r, r+1]`` in COCO coordinates, so the points sit on pixel edges.
    """
    components_hw, n_components = ndimage.label(mask_hw)
    polygons = []
    for component in range(1, n_components + 1):
        padded_hw = np.pad((components_hw == component).astype(np.float64), 1)
        # -1 undoes the padding, +0.5 moves from pixel centers to COCO coordinates; a
        # closed contour repeats its first point, which is dropped.
        rings = [c[:-1, ::-1] - 0.5 for c in measure.find_contours(padded_hw, 0.5)]
        rings = [r for r in rings if len(r) >= 3]
        if not rings:
            continue
        rings.sort(key=lambda r: -abs(_signed_area(r)))
        polygon_k2 = rings[0]  # the outer contour encloses all others of its component
        for hole_k2 in rings[1:]:
            polygon_k2 = _bridge_hole(polygon_k2, hole_k2)
        polygons.append([round(float(v), 2) for v in polygon_k2.reshape(-1)])
    return polygons


def _coco_annotation(
    mask_hw: np.ndarray, cls: int, source: int, ann_id: int, image_id: int, mask_format: str
) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask_hw.astype(np.uint8)))
    if mask_format == "rle":
        segmentation: Any = {
            "size": [int(s) for s in rle["size"]],
            "counts": rle["counts"].decode("ascii"),
        }
    else:
        segmentation = mask_to_polygons(mask_hw)
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cls + 1,
        "segmentation": segmentation,
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
        "fashion_mnist_index": source,
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_split(
    root: Path,
    split: str,
    n_images: int,
    composer: SceneComposer,
    seed: int,
    mask_format: str,
    void_border: int,
) -> dict[str, Any]:
    coco_dir = root / "coco" / f"{split}2017"
    ade_images = root / "ade" / "images" / _ADE_SPLIT[split]
    ade_labels = root / "ade" / "annotations" / _ADE_SPLIT[split]
    for folder in (coco_dir, ade_images, ade_labels):
        folder.mkdir(parents=True)
    images, annotations = [], []
    per_class = [0] * len(FASHION_MNIST_CLASSES)
    for index in range(n_images):
        scene = composer.compose(scene_rng(seed, split, index))
        image_id = index + 1
        stem = f"{image_id:06d}"
        Image.fromarray(scene.image_hwc).save(coco_dir / f"{stem}.png")
        Image.fromarray(scene.image_hwc).save(ade_images / f"{stem}.jpg", quality=95)
        Image.fromarray(semantic_label(scene, void_border)).save(ade_labels / f"{stem}.png")
        size = composer.img_size
        images.append({"id": image_id, "file_name": f"{stem}.png", "height": size, "width": size})
        for mask_hw, cls, source in zip(
            scene.masks_nhw, scene.classes_n, scene.sources_n, strict=True
        ):
            ann_id = len(annotations) + 1
            annotations.append(
                _coco_annotation(mask_hw, int(cls), int(source), ann_id, image_id, mask_format)
            )
            per_class[int(cls)] += 1
    coco = {
        "info": {"description": f"a2mim toy scenes ({split}), seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "fashion"}
            for i, name in enumerate(FASHION_MNIST_CLASSES)
        ],
    }
    ann_path = root / "coco" / "annotations" / f"instances_{split}2017.json"
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    ann_path.write_text(json.dumps(coco), encoding="utf-8")
    return {
        "images": n_images,
        "instances": len(annotations),
        "instances_per_class": dict(zip(FASHION_MNIST_CLASSES, per_class, strict=True)),
        "fashion_mnist_source": f"{_FMNIST_PREFIX[split]} (first {OBJECT_POOL_SIZE} items)",
        "coco_annotations": ann_path.relative_to(root).as_posix(),
        "coco_images": coco_dir.relative_to(root).as_posix(),
        "ade_split": _ADE_SPLIT[split],
    }


def make_scenes(
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    img_size: int = 128,
    objects_per_image: tuple[int, int] = (1, 3),
    seed: int = 0,
    fmnist_dir: str | Path | None = None,
    mask_format: str = "polygon",
    scale: tuple[float, float] = (1.5, 2.5),
    void_border: int = 1,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate the scene set (COCO instances + ADE semantic labels) under ``out_dir``.

    Deterministic given the arguments (files are byte-identical across runs). The set is
    built in a temporary sibling folder and renamed into place, so ``out_dir`` is either
    absent or complete. Returns the manifest, also written to ``out_dir/manifest.json``.

    Args:
        out_dir: destination folder; must not exist unless ``overwrite``.
        n_train, n_val: number of scenes per split.
        img_size: side of the square scenes in pixels.
        objects_per_image: inclusive range of pasted objects (fewer when no room is left).
        seed: random seed.
        fmnist_dir: folder with the Fashion-MNIST ``*-ubyte.gz`` files
            (default ``/usr/share/datasets/fashion-mnist``).
        mask_format: "polygon" or "rle" for the COCO segmentations.
        scale: range of the upscaling factor of the 28x28 items.
        void_border: width of the unlabeled (0) ADE band around objects; 0 disables it.
        overwrite: replace an existing ``out_dir``.
    """
    if mask_format not in ("polygon", "rle"):
        raise ValueError(f"mask_format must be 'polygon' or 'rle', got {mask_format!r}")
    if n_train < 1 or n_val < 1:
        raise ValueError(f"n_train and n_val must be >= 1, got {n_train}, {n_val}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; remove it or pass overwrite=True")
    fmnist_dir = Path(fmnist_dir) if fmnist_dir is not None else DEFAULT_FMNIST_DIR
    backgrounds = load_backgrounds()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    try:
        splits = {}
        for split, n_images in (("train", n_train), ("val", n_val)):
            composer = SceneComposer.from_sources(
                split, img_size, objects_per_image, scale, fmnist_dir, backgrounds
            )
            splits[split] = _write_split(
                tmp_dir, split, n_images, composer, seed, mask_format, void_border
            )
        files = sorted(p for p in tmp_dir.rglob("*") if p.is_file())
        manifest = {
            "generator": "a2mim.data.scenes.make_scenes",
            "params": {
                "n_train": n_train,
                "n_val": n_val,
                "img_size": img_size,
                "objects_per_image": list(objects_per_image),
                "seed": seed,
                "mask_format": mask_format,
                "scale": list(scale),
                "void_border": void_border,
                "silhouette_threshold": SILHOUETTE_THRESHOLD,
            },
            "classes": list(FASHION_MNIST_CLASSES),
            "coco_category_ids": list(range(1, len(FASHION_MNIST_CLASSES) + 1)),
            "backgrounds": [f"skimage.data.{name}" for name in BACKGROUND_PHOTOS],
            "coco": {"root": "coco"},
            "ade": {
                "root": "ade",
                "reduce_zero_label": True,
                "num_classes": ADE_NUM_CLASSES,
                "raw_values": {
                    str(ADE_UNLABELED): "unlabeled band around objects (ignored)",
                    str(ADE_BACKGROUND): "background photo",
                    **{
                        str(ADE_CLASS_OFFSET + i): name
                        for i, name in enumerate(FASHION_MNIST_CLASSES)
                    },
                },
            },
            "splits": splits,
            "sources": {p.name: _sha256(p) for p in sorted(fmnist_dir.glob("*-ubyte.gz"))},
            "files": {p.relative_to(tmp_dir).as_posix(): _sha256(p) for p in files},
        }
        (tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        if out_dir.exists():
            old_dir = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old_dir)
            tmp_dir.rename(out_dir)
            shutil.rmtree(old_dir)
        else:
            tmp_dir.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest

"""What does building an ImageFolder index cost, with and without opening every image?

Writes ``--images`` small JPEGs into a temporary ``root/train/<class>/`` tree, then times, in one
run and interleaved, building :class:`a2mim.data.imagefolder.ImageFolderDataset` (lists folders,
opens no image: the default) and building it followed by :meth:`verify` (PIL open + verify of
every file: what every process did at start-up before). Prints the median times, the cost per
file, and as the last line ``index_us_per_file=... verify_us_per_file=... ratio=...``. The file
cache is warm in both (the files were just written), as on a node that has read them once.

    python benchmarks/imagefolder_index.py                    # 20,000 files
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from a2mim.data.imagefolder import ImageFolderDataset


def write_tree(root: Path, count: int, classes: int) -> None:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    data = buf.getvalue()
    for k in range(classes):
        (root / "train" / f"c{k:03d}").mkdir(parents=True)
    for i in range(count):
        (root / "train" / f"c{i % classes:03d}" / f"{i:07d}.jpg").write_bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="a2mim-index-") as tmp:
        root = Path(tmp)
        write_tree(root, args.images, args.classes)
        runs = {
            "index": lambda: ImageFolderDataset(root, "train"),
            "index+verify": lambda: ImageFolderDataset(root, "train").verify(),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for round_index in range(args.rounds):
            names = list(runs) if round_index % 2 == 0 else list(reversed(runs))
            for name in names:
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in med.items():
        print(
            f"{name:13s} {t:7.3f} s for {args.images} files ({1e6 * t / args.images:.1f} us each)"
        )
    index_us = 1e6 * med["index"] / args.images
    verify_us = 1e6 * med["index+verify"] / args.images
    print(
        f"index_us_per_file={index_us:.1f} verify_us_per_file={verify_us:.1f} "
        f"ratio={med['index+verify'] / med['index']:.1f}"
    )


if __name__ == "__main__":
    main()

"""The paper's tables (``a2mim/data/paper_tables.yaml``) and what each column measures."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

import yaml

PAPER_RESOURCE = "paper_tables.yaml"
DETECTION_COLUMNS = ("coco_ap_box", "coco_ap_mask")
PAPER_DATASET_NAMES = {
    "imagenet-1k": "ImageNet-1K",
    "imagenet-100": "ImageNet-100",
    "coco-2017": "COCO 2017",
    "ade20k": "ADE20K",
}
_SHORT_RE = re.compile(r"^(table\d+)_")


class TablesError(ValueError):
    """The runs or the request cannot make the tables; the message says why and how to fix it."""


@dataclass(frozen=True)
class PaperTable:
    """One table of the paper: ``rows[row][i]`` is the number in ``columns[i]`` (None: none)."""

    key: str
    caption: str
    columns: tuple[str, ...]
    rows: Mapping[str, tuple[float | None, ...]]

    @property
    def short(self) -> str:
        """``table1`` for ``table1_resnet50_in1k``: the name of the output files."""
        return _SHORT_RE.match(self.key).group(1)

    def paper(self, row: str, column: str) -> float | None:
        return self.rows[row][self.columns.index(column)]

    def decimals(self, column: str) -> int:
        """Digits after the point in the paper's column, so that ours reads alike."""
        digits = [_decimals(v[self.columns.index(column)]) for v in self.rows.values()]
        known = [d for d in digits if d is not None]
        return max(known) if known else 1


def _decimals(value: float | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return 0
    text = repr(float(value))
    return len(text.split(".")[1].rstrip("0")) if "." in text else 0


def load_paper_tables() -> dict[str, PaperTable]:
    """The ``table<N>_*`` entries of the package's copy of the paper's ``paper_tables.yaml``."""
    where = f"a2mim/data/{PAPER_RESOURCE}"
    data = yaml.safe_load(resources.files("a2mim.data").joinpath(PAPER_RESOURCE).read_text())
    tables = {}
    for key, entry in data.items():
        if not _SHORT_RE.match(key):
            continue
        columns = tuple(entry["columns"])
        rows = {}
        for row, values in entry["rows"].items():
            if len(values) != len(columns) or "," in row:
                raise TablesError(
                    f"{where}: {key} row {row!r} must have {len(columns)} values and no ','"
                )
            rows[str(row)] = tuple(values)
        for column in columns:
            column_metric(column)  # an unknown column is an error here, not a blank later
        tables[key] = PaperTable(key, entry["caption"], columns, rows)
    return tables


def is_epochs(column: str) -> bool:
    return column == "epochs" or column.endswith("_epochs")


def column_metric(column: str) -> str | None:
    """The MLflow metric behind a paper column; None for an epochs column (a tag, not a metric).

    ``*_lin``, ``*_ft*`` and Table 5's backbone columns are top-1 (fine-tune, linear probe);
    COCO columns are box/mask AP; ADE20K is mIoU."""
    if is_epochs(column):
        return None
    if column == "coco_ap_box":
        return "ap_box"
    if column == "coco_ap_mask":
        return "ap_mask"
    if column == "ade20k_miou":
        return "miou"
    if column.endswith("_lin") or "_ft" in column or column in ("resnet50", "vit_s"):
        return "top1"
    raise TablesError(
        f"paper column {column!r} has no known metric: add it to a2mim.tables.column_metric"
    )


def paper_dataset(table_key: str, column: str) -> str:
    """The paper's dataset of a column: COCO 2017 (AP), ADE20K (mIoU), ImageNet-100 (Table 5),
    else ImageNet-1K (a key of :data:`PAPER_DATASET_NAMES`)."""
    if column in DETECTION_COLUMNS:
        return "coco-2017"
    if column == "ade20k_miou":
        return "ade20k"
    return "imagenet-100" if table_key.endswith("_in100") else "imagenet-1k"


def epochs_scope(table: PaperTable, column: str) -> tuple[str, ...]:
    """The metric columns whose runs give an epochs column its value: ``fast_epochs`` governs
    ``fast_*``, a bare ``epochs`` every metric column of the table."""
    prefix = "" if column == "epochs" else column.removesuffix("epochs")
    return tuple(c for c in table.columns if not is_epochs(c) and c.startswith(prefix))

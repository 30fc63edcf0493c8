"""Transfer of reference-ViT encoders (timm ``Beit``: LayerScale, a relative position bias table
per block over the pre-training grid plus the absolute position embedding) to dense heads.

The reference ViT (`a2mim.backbones.beit`) stores, per block, a table of
``(2*14 - 1)**2 + 3`` values per head at 224 px (the 3 extra entries are the cls-to-token,
token-to-cls and cls-to-cls biases) and an absolute position embedding of ``1 + 14*14`` entries.
Downstream grids differ, so both are resampled:

- `resize_rel_pos_table`: timm's ``resize_rel_pos_bias_table`` (BEiT's own scheme: source offsets
  on a geometric progression stretched over the new extent, so that near offsets keep their
  values; linear interpolation of that non-uniform grid, or SciPy's cubic ``interp2d`` as BEiT's
  code when ``TIMM_USE_SCIPY_INTERP=1``), the 3 cls entries kept as they are;
- `resample_pos_embed`: bicubic (``align_corners=False``, no antialiasing; mmseg's and ViTDet's
  resize), the cls entry kept or dropped.

`encoder_family` names the backbone adapter family of a timm name (``beit``, ``vit``, ...);
`init_encoder` reads the encoder an init checkpoint was trained as from its ``meta`` (without
its weights), and `check_init_family` turns a family mismatch into a readable error. The
pre-flight (`a2mim.preflight`) and the workflow run these before anything is submitted.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table
from torch import nn

__all__ = [
    "CLS_ENTRIES",
    "check_init_family",
    "encoder_family",
    "init_encoder",
    "is_beit",
    "resample_pos_embed",
    "resize_rel_pos_table",
    "resize_state_to",
]

CLS_ENTRIES = 3  # cls->token, token->cls, cls->cls: the last rows of a BEiT table


def is_beit(model: nn.Module) -> bool:
    """True for timm's BEiT family (the reference ViT)."""
    from timm.models.beit import Beit

    return isinstance(model, Beit)


def resize_rel_pos_table(
    table: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """A BEiT relative position bias table ``((2h-1)(2w-1) + 3, heads)`` of grid ``old_grid``
    resized to ``new_grid`` with timm's ``resize_rel_pos_bias_table`` (the 3 cls entries kept;
    the table itself when the grids are equal)."""
    old, new = tuple(int(v) for v in old_grid), tuple(int(v) for v in new_grid)
    rows = (2 * new[0] - 1) * (2 * new[1] - 1) + CLS_ENTRIES
    expected = (2 * old[0] - 1) * (2 * old[1] - 1) + CLS_ENTRIES
    if table.shape[0] != expected:
        raise ValueError(
            f"a relative position bias table of {table.shape[0]} rows does not belong to a "
            f"{old[0]}x{old[1]} grid ((2h-1)(2w-1)+3 = {expected} rows)"
        )
    if old == new:
        return table
    with warnings.catch_warnings():  # timm's interpolator: torch indexing deprecation notes
        warnings.simplefilter("ignore", UserWarning)
        return resize_rel_pos_bias_table(
            table, new_window_size=new, new_bias_shape=(rows, table.shape[1]), old_window_size=old
        )


def resample_pos_embed(
    pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], prefix: int = 1
) -> torch.Tensor:
    """``(1, prefix + h*w, C)`` absolute position embedding on ``old_grid`` resampled to
    ``new_grid`` (bicubic, no antialiasing; identity at the same grid), prefix entries kept."""
    return resample_abs_pos_embed(
        pos,
        new_size=list(new_grid),
        old_size=list(old_grid),
        num_prefix_tokens=prefix,
        antialias=False,
    )


def resize_state_to(
    state: dict[str, torch.Tensor], source: nn.Module, target: nn.Module
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` (keys of the BEiT ``source``, the encoder as trained) with its position
    embedding and per-block relative position tables resampled to the grids of the BEiT
    ``target`` (the same encoder built at another input size); returns it and a list of what
    was resized. Keys that ``target`` lacks are left for the strict load to report."""
    state = dict(state)
    own = target.state_dict()
    resized = []
    old = tuple(source.patch_embed.grid_size)
    new = tuple(target.patch_embed.grid_size)
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape:
        state["pos_embed"] = resample_pos_embed(pos, old, new, source.num_prefix_tokens)
        resized.append(f"pos_embed: {tuple(pos.shape)} -> {tuple(state['pos_embed'].shape)}")
    windows = {
        f"blocks.{i}.attn.relative_position_bias_table": (
            tuple(block.attn.window_size),
            tuple(target.blocks[i].attn.window_size),
        )
        for i, block in enumerate(source.blocks)
        if i < len(target.blocks) and getattr(block.attn, "window_size", None) is not None
    }
    for key, (old_win, new_win) in windows.items():
        table = state.get(key)
        if table is None or key not in own or table.shape == own[key].shape:
            continue
        state[key] = resize_rel_pos_table(table, old_win, new_win)
        resized.append(f"{key}: {tuple(table.shape)} -> {tuple(state[key].shape)}")
    return state, resized


@functools.lru_cache(maxsize=64)
def _family(backbone: str, kwargs_json: str) -> str | None:
    import timm

    from a2mim.backbones import adapt

    kwargs = json.loads(kwargs_json)
    kwargs.pop("drop_path_rate", None)
    try:
        with torch.device("meta"):
            model = timm.create_model(backbone, pretrained=False, num_classes=0, **kwargs)
        return adapt(model).family
    except (TypeError, ValueError, RuntimeError, KeyError):
        return None


def encoder_family(backbone: str, kwargs: dict[str, Any] | None = None) -> str | None:
    """The backbone adapter family (``beit``, ``vit``, ``resnet``, ...) of timm model
    ``backbone`` built with ``kwargs`` (on the meta device: no memory, no weights); None when
    no adapter handles it or it cannot be built."""
    return _family(backbone, json.dumps(kwargs or {}, sort_keys=True, default=str))


def init_encoder(path: str | Path) -> dict[str, Any] | None:
    """``{"backbone", "backbone_kwargs", "img_size", "preset", "stage"}`` from the ``meta`` of
    an init checkpoint (``encoder.pt`` of a pretrain run, ``model.pt`` of a finetune run); the
    weights are memory-mapped, not read. None when the file holds no such meta."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not ours to judge here: the stage's load names the problem
        return None
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("backbone"), str):
        return None
    keys = ("stage", "backbone", "backbone_kwargs", "img_size", "preset")
    return {k: meta.get(k) for k in keys}


def check_init_family(
    init: dict[str, Any], backbone: str, kwargs: dict[str, Any] | None, where: str
) -> str | None:
    """A message when the encoder ``init`` was trained as (`init_encoder`) and the config's
    ``backbone`` / ``kwargs`` are of different adapter families (a reference ViT, timm BEiT,
    into a plain ViT or the reverse); None when they agree or a family is unknown."""
    trained = encoder_family(init["backbone"], init.get("backbone_kwargs") or {})
    built = encoder_family(backbone, kwargs or {})
    if trained is None or built is None or trained == built:
        return None
    preset = f", preset {init['preset']}" if init.get("preset") else ""
    return (
        f"{where}: the init encoder is a {_NAMES.get(trained, trained)} ({init['backbone']} "
        f"{init.get('backbone_kwargs') or {}}{preset}), the config builds a "
        f"{_NAMES.get(built, built)} ({backbone} {kwargs or {}}); its weights do not fit. Use "
        f"the recipe for that encoder ({_RECIPE_HINT.get(trained, _DEFAULT_HINT)})"
    )


_DEFAULT_HINT = "set model.backbone and model.backbone_kwargs to the init's meta"


_NAMES = {
    "beit": "reference ViT (timm BEiT: LayerScale, relative position bias per block)",
    "vit": "plain ViT (timm VisionTransformer)",
}
_RECIPE_HINT = {
    "beit": "detect vitb_fpn_1x, segment upernet_vitb_160k, or set model.backbone: "
    "beit_base_patch16_224 with the init's backbone_kwargs",
    "vit": "detect vitb_plain_fpn_1x, segment upernet_vitb_plain_160k, or a config whose "
    "model.backbone and model.backbone_kwargs are the init's",
}

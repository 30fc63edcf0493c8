"""Named YAML recipes shipped with the package: ``<stage>_<name>.yaml``."""

from __future__ import annotations

from pathlib import Path

RECIPE_DIR = Path(__file__).parent


def available(stage: str) -> list[str]:
    return sorted(p.stem[len(stage) + 1 :] for p in RECIPE_DIR.glob(f"{stage}_*.yaml"))


def resolve(stage: str, name_or_path: str) -> Path:
    """A config file path, or the path of the named recipe of ``stage``."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    recipe = RECIPE_DIR / f"{stage}_{name_or_path}.yaml"
    if not recipe.exists():
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a config file nor a {stage} recipe; "
            f"recipes: {available(stage)}"
        )
    return recipe

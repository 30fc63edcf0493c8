"""envs/a2mim.yaml (the rules' conda environment) pins exactly pyproject.toml's dependencies."""

from __future__ import annotations

from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _pyproject_pins() -> set[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {d.replace(" ", "") for d in data["project"]["dependencies"]}


def _env_pins() -> tuple[set[str], list[str]]:
    env = yaml.safe_load((ROOT / "envs" / "a2mim.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    options = [p for p in pip if p.startswith("-")]
    return {p.replace(" ", "") for p in pip if not p.startswith("-")}, options


def test_conda_env_pins_match_pyproject() -> None:
    pins, _ = _env_pins()
    wanted = _pyproject_pins()
    assert pins == wanted, (
        f"envs/a2mim.yaml and pyproject.toml disagree: only in the env {sorted(pins - wanted)}, "
        f"only in pyproject {sorted(wanted - pins)}; copy pyproject's dependencies into the env"
    )


def test_conda_env_installs_this_package_and_its_python() -> None:
    env = yaml.safe_load((ROOT / "envs" / "a2mim.yaml").read_text())
    _, options = _env_pins()
    assert "--editable .." in options  # the package itself, from the repository root
    python = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python=")]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python and requires.startswith(">=")
    minimum = tuple(int(x) for x in requires[2:].split("."))
    assert tuple(int(x) for x in python[0].split("=")[1].split(".")) >= minimum

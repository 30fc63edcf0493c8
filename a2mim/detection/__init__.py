"""Mask R-CNN on timm encoders, built by torchvision or by detectron2 (the paper's library).

``resolve_backend("auto")`` picks detectron2 when it can be imported, else torchvision (and logs
the choice); asking for ``"detectron2"`` without it installed raises `BackendUnavailable` with
the install instructions, never a silent fallback. `check_backend` is the same check for a
pre-flight (before any job is submitted): it raises `BackendUnavailable` (a ``ConfigError``)
naming both fixes, building detectron2 or choosing ``backend: torchvision``. ``build_detector`` returns an ``nn.Module``
with one interface for both (see ``torchvision_backend``): ``forward(images, targets)`` gives
the loss dict in training mode and per-image predictions in eval mode; ``init_report`` and
``backend`` say what was loaded and which library runs it.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Literal

from torch import nn

from a2mim.config import ConfigError
from a2mim.detection.spec import DetectorSpec, Input

__all__ = [
    "DETECTRON2_INSTALL",
    "BackendUnavailable",
    "DetectorSpec",
    "Input",
    "build_detector",
    "check_backend",
    "detectron2_available",
    "resolve_backend",
]

log = logging.getLogger(__name__)

Backend = Literal["torchvision", "detectron2"]

DETECTRON2_INSTALL = (
    "detectron2 is not installed (it has no wheels for current torch); build it from upstream "
    "source into this environment:\n"
    "  git clone https://github.com/facebookresearch/detectron2\n"
    "  pip install -U pip 'setuptools<82' ninja\n"
    "  MAX_JOBS=2 pip install --no-build-isolation --no-deps -e ./detectron2\n"
    "  pip install fvcore iopath omegaconf hydra-core yacs termcolor black  # its dependencies\n"
    "or set backend: torchvision (or auto) in the config (in a workflow config: "
    "set: {backend: torchvision} in the detect run)"
)


class BackendUnavailable(ConfigError):
    """The configured detection backend cannot be imported; the message says how to install it."""


def detectron2_available() -> bool:
    return importlib.util.find_spec("detectron2") is not None


def resolve_backend(name: str) -> Backend:
    """The backend to run for config value ``name`` (``auto``, ``torchvision``, ``detectron2``)."""
    if name == "torchvision":
        return "torchvision"
    if name == "detectron2":
        if not detectron2_available():
            raise BackendUnavailable(f"backend: detectron2 was requested, but {DETECTRON2_INSTALL}")
        return "detectron2"
    if name == "auto":
        chosen: Backend = "detectron2" if detectron2_available() else "torchvision"
        log.warning(
            "backend: auto -> %s (%s)",
            chosen,
            "detectron2 is importable" if chosen == "detectron2" else "detectron2 is not installed",
        )
        return chosen
    raise ConfigError(f"backend must be auto, torchvision or detectron2, got {name!r}")


def check_backend(name: str) -> Backend:
    """Pre-flight check of config value ``name``: the backend a run with it will use. Raises
    `BackendUnavailable` (with the install instructions and the torchvision switch) when
    detectron2 is asked for and not importable, `ConfigError` for an unknown name."""
    return resolve_backend(name)


def build_detector(
    backend: Backend,
    spec: DetectorSpec,
    inputs: Input,
    num_classes: int,
    init: str | None = None,
    world_size: int = 1,
) -> nn.Module:
    """Mask R-CNN for ``num_classes`` foreground classes (labels 1..K) with ``backend``.
    Random init draws from the global torch generator: seed it first."""
    if backend == "detectron2":
        from a2mim.detection.detectron2_backend import Detectron2MaskRCNN

        return Detectron2MaskRCNN(spec, inputs, num_classes, init, world_size)
    from a2mim.detection.torchvision_backend import TorchvisionMaskRCNN

    return TorchvisionMaskRCNN(spec, inputs, num_classes, init, world_size)

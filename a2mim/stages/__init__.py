"""The stages: one module per stage (``run(cfg, out_dir) -> metrics``), listed by the registry.

The registry itself is :mod:`a2mim.registry`; its names are re-exported here so that
``from a2mim.stages import STAGES`` keeps working.
"""

from a2mim.registry import STAGES, Layout, Resources, Stage, get, matrix_stages

__all__ = ["STAGES", "Layout", "Resources", "Stage", "get", "matrix_stages"]

"""The experiment matrix of a workflow config, for the Snakefile's rules.

``workflow/rules/common.smk`` builds one :class:`Matrix` from Snakemake's (schema-validated)
``config``; rules ask it for paths, inputs, stage arguments and launcher options and stay thin.
It also checks what a JSON schema cannot: that every run's dataset, init, resources and table
cells name things that exist.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from a2mim import registry

STAGES = tuple(stage.name for stage in registry.matrix_stages())
TABLES = ("table1", "table2", "table3", "table4", "table5")
FIGURES = ("figure1", "figure3", "figure5")
PAPER_TABLES_PATH = Path(__file__).parent / "data" / "paper_tables.yaml"
PREFLIGHT_CACHE = Path(".snakemake") / "a2mim-preflight"  # passed checks (Matrix.preflight)


class ConfigMatrixError(ValueError):
    """A workflow config that passes the schema but names something that does not exist."""


def expose_cli() -> None:
    """Put the running interpreter's ``bin`` first on PATH: rules call ``a2mim`` of the
    environment Snakemake runs in, whether or not that environment is activated."""
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = os.pathsep.join([bindir, os.environ.get("PATH", "")])


def split_cell(cell: str) -> tuple[str, str, str]:
    """``table/row/column`` -> its parts; rows may contain ``/`` ("+ L_freq w/o omega")."""
    table, rest = cell.split("/", 1)
    row, column = rest.rsplit("/", 1)
    return table, row, column


def split_init(init: str) -> tuple[str, str]:
    """A run's ``init`` -> ``(stage, run)``: ``name`` is a pretrain run, ``finetune/name`` the
    fine-tuned classifier of a finetune run (a supervised encoder)."""
    stage, sep, name = init.partition("/")
    return (stage, name) if sep else ("pretrain", init)


def table_short(table_key: str) -> str:
    """``table1_resnet50_in1k`` -> ``table1``."""
    return table_key.split("_", 1)[0]


class Matrix:
    """Paths, inputs, arguments and resources of every run of one workflow config."""

    def __init__(self, config: Mapping[str, Any], paper_tables: Path = PAPER_TABLES_PATH):
        self.config = config
        self.experiment: str = config["experiment"]
        self.results: str = str(config["results"]).rstrip("/")
        self.launcher: str = config.get("launcher") or "local"
        self.tracking_uri: str = (
            config.get("tracking_uri") or f"sqlite:///{Path(self.results).resolve()}/mlflow.db"
        )
        self.paper_tables = yaml.safe_load(paper_tables.read_text())
        self.check()
        self.config = expand_seeds(config)  # after the checks, which name the runs as written

    # -- the matrix ------------------------------------------------------------------------

    def runs(self, stage: str) -> dict[str, dict[str, Any]]:
        return dict(self.config.get(stage) or {})

    def datasets(self, kind: str | None = None) -> list[str]:
        """Dataset names, or those with a ``kind`` key (``prepare``, ``scenes``, ``root``)."""
        items = self.config["datasets"].items()
        return [name for name, spec in items if kind is None or kind in spec]

    def figures(self) -> dict[str, dict[str, Any]]:
        return dict(self.config.get("analysis") or {})

    # -- checks the schema cannot express --------------------------------------------------

    def check(self) -> None:
        datasets = self.config["datasets"]
        resources = self.config.get("resources") or {}
        for stage in STAGES:
            for name, spec in self.runs(stage).items():
                where = f"{stage}.{name}"
                if spec["data"] not in datasets:
                    raise ConfigMatrixError(
                        f"{where}: data {spec['data']!r} is not a key of datasets "
                        f"({', '.join(datasets)}); add it under datasets or fix the name"
                    )
                if spec.get("init") is not None:
                    self._check_init(stage, where, spec["init"])
                if spec.get("resources") and spec["resources"] not in resources:
                    raise ConfigMatrixError(
                        f"{where}: resources {spec['resources']!r} is not a key of resources "
                        f"({', '.join(resources) or 'none'})"
                    )
                for cell in spec.get("cells") or []:
                    self._check_cell(where, cell)
        for figure, spec in self.figures().items():
            if spec["data"] not in datasets:
                raise ConfigMatrixError(f"analysis.{figure}: data {spec['data']!r} is unknown")
            for label, ref in spec["models"].items():
                if ref == "random":
                    continue
                stage, name = ref.split("/", 1)
                if name not in self.runs(stage):
                    raise ConfigMatrixError(
                        f"analysis.{figure}.models.{label}: {ref!r} is not a {stage} run of "
                        "this config"
                    )

    def _check_init(self, stage: str, where: str, init: str) -> None:
        if stage == "pretrain":
            raise ConfigMatrixError(f"{where}: pretrain runs take no init")
        source, name = split_init(init)
        if source not in ("pretrain", "finetune"):
            raise ConfigMatrixError(
                f"{where}: init {init!r}: name a pretrain run, or finetune/<run> for the "
                "supervised encoder of a finetune run"
            )
        if source == "finetune" and stage == "finetune":
            raise ConfigMatrixError(
                f"{where}: init {init!r}: a finetune run starts from a pretrain run or from "
                "scratch; a supervised init (finetune/<run>) is for linprobe, detect and segment"
            )
        if name not in self.runs(source):
            raise ConfigMatrixError(
                f"{where}: init {init!r} is not a {source} run of this config "
                f"({source} runs: {', '.join(self.runs(source)) or 'none'}); init names a "
                "pretrain run, or finetune/<run> for a supervised encoder"
            )

    def _check_cell(self, where: str, cell: str) -> None:
        table, row, column = split_cell(cell)
        if table not in self.paper_tables:
            known = ", ".join(k for k in self.paper_tables if k.startswith("table"))
            raise ConfigMatrixError(f"{where}: cell {cell!r}: no table {table!r} ({known})")
        spec = self.paper_tables[table]
        if row not in spec["rows"]:
            raise ConfigMatrixError(
                f"{where}: cell {cell!r}: {table} has no row {row!r} "
                f"(rows: {', '.join(spec['rows'])})"
            )
        if column not in spec["columns"]:
            raise ConfigMatrixError(
                f"{where}: cell {cell!r}: {table} has no column {column!r} "
                f"(columns: {', '.join(spec['columns'])})"
            )

    # -- paths -----------------------------------------------------------------------------

    def run_dir(self, stage: str, name: str) -> str:
        return f"{self.results}/runs/{stage}/{name}"

    def output_name(self, stage: str) -> str:
        """The file name a finished run of ``stage`` writes last (``encoder.pt``, ...)."""
        return registry.get(stage).output

    def run_output(self, stage: str, name: str) -> str:
        """The file a finished run writes last: what downstream rules and targets wait for."""
        return f"{self.run_dir(stage, name)}/{registry.get(stage).output}"

    def dataset_root(self, name: str, stage: str | None = None) -> str:
        """Where ``stage`` reads dataset ``name``: an external root as given; a generated scenes
        set holds a COCO 2017 root (detect, ``coco/``) and an ADE20K root (segment, ``ade/``)."""
        spec = self.config["datasets"][name]
        root = spec.get("root", f"{self.results}/data/{name}")
        if "scenes" not in spec or stage not in ("detect", "segment"):
            return root
        return f"{root}/{'ade' if stage == 'segment' else 'coco'}"

    def table_outputs(self, tables: Iterable[str] = TABLES) -> list[str]:
        return [f"{self.results}/tables/{t}.{ext}" for t in tables for ext in ("md", "csv", "tex")]

    def figure_outputs(self, figures: Iterable[str] | None = None) -> list[str]:
        names = self.figures() if figures is None else figures
        return [f"{self.results}/figures/{f}/{f}.png" for f in names]

    # -- inputs ----------------------------------------------------------------------------

    def dataset_input(self, stage: str, name: str) -> list[str]:
        """The manifest of a dataset a rule makes; nothing for an external root (the stage
        reports a missing one with its path)."""
        return self._data_manifest(self.runs(stage)[name]["data"])

    def _data_manifest(self, data: str) -> list[str]:
        spec = self.config["datasets"][data]
        if "root" in spec:
            return []
        manifest = "manifest.json" if "scenes" in spec else "PREPARED.json"
        return [f"{self.results}/data/{data}/{manifest}"]

    def init_input(self, stage: str, name: str) -> list[str]:
        """What a run waits for before it starts from its init (the init run's last output)."""
        init = self.runs(stage)[name].get("init")
        return [] if init is None else [self.run_output(*split_init(init))]

    def init_arg(self, stage: str, name: str) -> str:
        """``--init <checkpoint>``: a pretrain run's ``encoder.pt``, or a finetune run's
        ``model.pt`` (a supervised encoder); empty for a run from scratch."""
        init = self.runs(stage)[name].get("init")
        if init is None:
            return ""
        source, run = split_init(init)
        weights = "encoder.pt" if source == "pretrain" else "model.pt"
        return shlex.join(["--init", f"{self.run_dir(source, run)}/{weights}"])

    def table_inputs(self, table: str) -> list[str]:
        """Outputs of every run that fills a cell of ``table`` (``table1`` ... ``table5``).

        A table that no run of this config fills is still written (paper numbers, ours empty),
        after all the runs that fill other tables, so that it reflects the finished experiment."""
        own = self._cell_runs(lambda key: table_short(key) == table)
        return own or self._cell_runs(lambda key: True)

    def run_outputs(self) -> list[str]:
        """The last output of every run of the config: the experiment table lists them all,
        also the runs that fill no paper cell."""
        return [self.run_output(stage, name) for stage in STAGES for name in self.runs(stage)]

    def _cell_runs(self, wanted) -> list[str]:
        return [
            self.run_output(stage, name)
            for stage in STAGES
            for name, spec in self.runs(stage).items()
            if any(wanted(split_cell(c)[0]) for c in spec.get("cells") or [])
        ]

    def figure_inputs(self, figure: str) -> list[str]:
        spec = self.figures()[figure]
        files = self._data_manifest(spec["data"])
        refs = [ref for ref in spec["models"].values() if ref != "random"]
        return files + [self.run_output(*ref.split("/", 1)) for ref in refs]

    # -- arguments -------------------------------------------------------------------------

    def epochs(self, stage: str, name: str) -> int:
        """The training epochs of a run: its ``set: {epochs: ...}``, else its recipe's."""
        from a2mim import recipes
        from a2mim.config import load_yaml

        spec = self.runs(stage)[name]
        sets = spec.get("set") or {}
        if "epochs" in sets:
            return int(sets["epochs"])
        return int(load_yaml(recipes.resolve(stage, spec["recipe"])).get("epochs", 0))

    def stage_args(self, stage: str, name: str) -> str:
        """``--config ... --out ... --set ... --tag ...`` of one run, shell-quoted."""
        spec = self.runs(stage)[name]
        sets = {
            "data.root": self.dataset_root(spec["data"], stage),
            "progress": False,
            "tracking_uri": self.tracking_uri,
            **(spec.get("set") or {}),
        }
        tags = {"experiment": self.experiment, "run_name": f"{stage}/{name}"}
        tags |= self.dataset_tags(spec["data"])
        if "seed" in spec:  # one run of a run with `seeds:` (expand_seeds)
            sets["seed"] = spec["seed"]
            tags |= {"seed": str(spec["seed"]), "seed_group": f"{stage}/{spec['seed_group']}"}
        if spec.get("cells"):
            tags["cells"] = ",".join(spec["cells"])
        # pretrain_epochs: the Epochs column of the tables; for a supervised init, the epochs of
        # its supervised training (the paper's "(Sup.)" rows list those).
        if spec.get("init"):
            source, run = split_init(spec["init"])
            tags["pretrain_run"] = spec["init"]
            tags["pretrain_epochs"] = str(self.epochs(source, run))
        elif stage == "pretrain":
            tags["pretrain_epochs"] = str(self.epochs(stage, name))
        args = ["--config", spec["recipe"], "--out", self.run_dir(stage, name)]
        args += _sets(sets)
        for key, value in tags.items():
            args += ["--tag", f"{key}={value}"]
        return shlex.join(args)

    def dataset_tags(self, data: str) -> dict[str, str]:
        """``dataset`` (the config's name) and, when the config declares it the paper's
        (``paper:``), ``paper_dataset``: the tables print a paper delta only for those."""
        tags = {"dataset": data}
        paper = self.config["datasets"][data].get("paper")
        return tags | ({"paper_dataset": paper} if paper else {})

    def figure_args(self, figure: str) -> str:
        spec = self.figures()[figure]
        sets = {
            "data.root": self.dataset_root(spec["data"]),
            "tracking_uri": self.tracking_uri,
            **(spec.get("set") or {}),
        }
        args = ["--config", spec["recipe"], "--out", f"{self.results}/figures/{figure}"]
        for label, ref in spec["models"].items():
            path = ref if ref == "random" else self.run_dir(*ref.split("/", 1))
            args += ["--model", f"{label}={path}"]
        args += _sets(sets)
        args += ["--tag", f"experiment={self.experiment}"]
        return shlex.join(args)

    def prepare_args(self, dataset: str) -> str:
        """``a2mim prepare`` options of a dataset the workflow makes (prepare or scenes)."""
        spec = self.config["datasets"][dataset]
        spec = spec.get("prepare") or spec["scenes"]
        args: list[str] = []
        for key in ("train_per_class", "val_per_class", "seed", "train", "val", "size"):
            if key in spec:
                args += [f"--{key.replace('_', '-')}", str(spec[key])]
        return shlex.join(args)

    def resources(self, stage: str, name: str | None = None) -> registry.Resources:
        """The stage's registry defaults, then the config's ``resources.default``, then its
        entry for the run's ``resources`` key (default: the stage name)."""
        table = self.config.get("resources") or {}
        key = (
            self.runs(stage)[name].get("resources") if name in self.runs(stage) else None
        ) or stage
        values = {
            **registry.get(stage).resources.as_dict(),
            **(table.get("default") or {}),
            **(table.get(key) or {}),
        }
        return registry.Resources(**values)

    def launch_args(self, stage: str, name: str) -> str:
        """``a2mim launch`` options: executor, the target's job folder and its resources."""
        res = self.resources(stage, name)
        args = ["--cluster", self.launcher, "--preflighted"]  # common.smk runs `preflight`
        args += ["--job-dir", f"{self.results}/jobs/{stage}/{name}"]
        args += ["--name", f"a2mim-{self.experiment}-{stage}-{name}"]
        for key, value in res.as_dict().items():
            if key == "slurm_args":
                for arg, text in value.items():
                    args += ["--slurm-arg", f"{arg}={text}"]
            elif value is not None:
                args += [f"--{key.replace('_', '-')}", str(value)]
        return shlex.join(args)

    # -- pre-flight ------------------------------------------------------------------------

    def preflight(self, dry_run: bool = False, cache: Path | None = PREFLIGHT_CACHE) -> list[str]:
        """Resolve and validate every run's stage command as its job will (recipe, sets, keys,
        types, ranges, backend, backbone, dataset layout), so that ``snakemake -n`` already
        fails on what would fail in a job; every problem of every run is listed at once (one
        line per problem, with the runs it stops), then nothing is run or submitted.

        A backend that is not installed here and an external dataset root
        (``datasets.<name>.root``) that does not exist here stop a real run, unless the config
        says ``plan_elsewhere: true`` (or ``A2MIM_PLAN_ELSEWHERE=1``: planning on a machine other
        than the jobs', e.g. a login node without the data), which turns exactly those into
        labelled warnings (returned and printed) and passes the setting on to the launchers' own
        checks. A dry run (``dry_run``: ``snakemake -n``, which plans and submits nothing) prints
        those two as warnings saying that a real run here would stop; every other problem stops
        it as it stops a real run. A dataset a rule of the DAG makes is exempt until made; a root
        that exists with the wrong layout is always an error.

        Checking imports every stage's module (torch, timm, torchmetrics: seconds each), so a
        passed check is remembered in ``cache`` (Snakemake's own ``.snakemake/`` folder), keyed
        by the command, the package's files, whether detectron2 is installed, the strictness
        and the state of the run's data root and init file; a change to any of them checks it
        again."""
        from a2mim import command, preflight
        from a2mim.config import ConfigError

        elsewhere = preflight.plan_elsewhere(self.config)
        if elsewhere:  # `a2mim launch` checks again before it submits: same opt-out there
            os.environ[preflight.PLAN_ELSEWHERE_ENV] = "1"
        label = preflight.PLAN_ELSEWHERE_LABEL if elsewhere else preflight.DRY_RUN_LABEL
        elsewhere = elsewhere or dry_run  # machine-dependent checks warn (nothing is submitted)
        todo = [
            (
                f"{stage}.{name}",
                stage,
                spec["data"],
                [stage, *shlex.split(self.stage_args(stage, name))],
            )
            for stage in STAGES
            for name, spec in self.runs(stage).items()
        ]
        todo += [
            (
                f"analysis.{fig}",
                "analyze",
                spec["data"],
                ["analyze", fig, *shlex.split(self.figure_args(fig))],
            )
            for fig, spec in self.figures().items()
        ]
        uses: dict[str, tuple[str, set[str], set[str]]] = {}
        for where, stage, data, _ in todo:
            spec = self.config["datasets"][data]
            if "root" in spec:  # external: must exist; made by a rule: exempt until made
                entry = uses.setdefault(data, (spec["root"], set(), set()))
                entry[1].add(registry.get(stage).layout)
                entry[2].add(where)
        errors: dict[str, list[str]] = {
            text: [] for text in preflight.missing_roots(uses)
        }  # problem -> the runs it stops (named in the text for a missing root)
        warnings: dict[str, list[str]] = {}
        if elsewhere:
            warnings, errors = {text: [] for text in errors}, {}
        package = _package_stamp()
        for where, _, _, argv in todo:
            memo = cache / _check_key(argv, package, not elsewhere) if cache else None
            if memo is not None and memo.is_file():
                found = json.loads(memo.read_text())
            else:
                try:
                    found = command.check(
                        argv, require_data=False, require_env=not elsewhere, missing_root="ignore"
                    )
                except (ConfigError, FileNotFoundError, ValueError) as exc:
                    config = argv[argv.index("--config") + 1]
                    errors.setdefault(str(exc), []).append(
                        f"{where} (`a2mim {argv[0]} --config {config} ...`)"
                    )
                    continue
                if memo is not None:
                    memo.parent.mkdir(parents=True, exist_ok=True)
                    memo.write_text(json.dumps(found))
            for text in found:
                warnings.setdefault(text, []).append(where)
        for text, runs in warnings.items():
            where = f" for {', '.join(runs)}" if runs else ""
            print(f"{label}{where}: {text}", file=sys.stderr)
        if errors:
            lines = [
                f"- {', '.join(runs)}: {text}" if runs else f"- {text}"
                for text, runs in errors.items()
            ]
            raise ConfigMatrixError(
                f"pre-flight found {len(errors)} problem(s); nothing was run or submitted. Fix "
                "each (a run's recipe or its set: in the workflow config, the dataset roots, the "
                f"environment) {preflight.PLAN_ELSEWHERE_HELP}:\n" + "\n".join(lines)
            )
        return list(warnings)

    def check_chains(self, cache: Path | None = PREFLIGHT_CACHE) -> None:
        """Before anything ran: every run that starts from another run's encoder (``init``)
        builds a backbone of the family that run trains (`a2mim.preflight.check_chain`: a
        reference-ViT, BEiT, pretrain run into a plain-ViT transfer recipe, or the reverse, is a
        `ConfigMatrixError` naming both and the recipe to use). Once the init file exists, the
        stage's own pre-flight reads its ``meta`` instead. Passed checks are remembered in
        ``cache`` (keyed by both commands and the package's files)."""
        from a2mim import preflight
        from a2mim.config import ConfigError

        package = _package_stamp()
        for stage in STAGES:
            for name, spec in self.runs(stage).items():
                if spec.get("init") is None:
                    continue
                argv = [stage, *shlex.split(self.stage_args(stage, name))]
                argv += shlex.split(self.init_arg(stage, name))
                source, run = split_init(spec["init"])
                init_argv = [source, *shlex.split(self.stage_args(source, run))]
                text = json.dumps(["chain", argv, init_argv, package])
                memo = cache / hashlib.sha256(text.encode()).hexdigest()[:32] if cache else None
                if memo is not None and memo.is_file():
                    continue
                try:
                    preflight.check_chain(argv, init_argv, f"init {spec['init']}")
                except (ConfigError, FileNotFoundError, ValueError) as exc:
                    raise ConfigMatrixError(
                        f"{stage}.{name}: {exc}; fix the run's recipe or its set: in the "
                        "workflow config"
                    ) from None
                if memo is not None:
                    memo.parent.mkdir(parents=True, exist_ok=True)
                    memo.write_text("[]")

    def threads(self, stage: str, name: str) -> int:
        """Cores a job takes from Snakemake's budget: its CPUs when it runs on this machine;
        none when it is a SLURM job (the launcher only waits), so `cores` never limits how many
        jobs are queued on the cluster."""
        if self.launcher == "slurm":
            return 0
        res = self.resources(stage, name)
        return res.cpus_per_task * res.tasks_per_node


def _package_stamp() -> str:
    """Names, sizes and times of the package's files (code, recipes): a new version changes it."""
    root = Path(__file__).parent
    files = sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml") and p.is_file())
    return hashlib.sha256(
        "\n".join(
            f"{p.relative_to(root)} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files
        ).encode()
    ).hexdigest()


def _path_stamp(text: str) -> str:
    """A path's state as far as a check reads it: missing, or its time and its entries'."""
    path = Path(text)
    if not path.exists():
        return f"{text}: missing"
    entries = sorted(path.iterdir()) if path.is_dir() else []
    return f"{text}: " + " ".join(str(p.stat().st_mtime_ns) for p in [path, *entries])


def _check_key(argv: list[str], package: str, strict_env: bool) -> str:
    paths = [v.split("=", 1)[1].strip('"') for v in argv if v.startswith("data.root=")]
    paths += [argv[i + 1] for i, v in enumerate(argv[:-1]) if v == "--init"]
    d2 = importlib.util.find_spec("detectron2") is not None
    text = json.dumps([argv, package, strict_env, d2, [_path_stamp(p) for p in paths]])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def per_run(method: Callable[[str, str], Any], stage: str) -> Callable[[Any], Any]:
    """A rule's input/params/threads function: ``method(stage, wildcards.name)``."""
    return lambda wildcards: method(stage, wildcards.name)


def seed_run_name(name: str, seed: int) -> str:
    """The run (and folder) name of seed ``seed`` of run ``name``: ``name.seed<seed>``."""
    return f"{name}.seed{seed}"


def expand_seeds(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with every run that lists ``seeds: [s0, s1, ...]`` replaced by one run per
    seed, ``<name>.seed<s>`` (its own folder, job and MLflow run, tagged ``seed``), each
    holding ``seed`` (set as the stage's ``seed``) and ``seed_group`` (the name as written).

    Inits follow the seeds: a seeded run whose init is a seeded run starts from the init's run
    of the same seed (or, when the init lacks that seed, from its first seed); any other run
    naming a seeded run (an init without seeds, an analysis model) gets its first seed's run."""
    out = {k: v for k, v in config.items() if k not in STAGES and k != "analysis"}
    seeds = {
        (stage, name): list(spec.get("seeds") or [])
        for stage in STAGES
        for name, spec in (config.get(stage) or {}).items()
    }

    def ref(stage: str, name: str, seed: int | None) -> str:
        own = seeds.get((stage, name)) or []
        if not own:
            return name
        return seed_run_name(name, seed if seed in own else own[0])

    def init_of(init: str | None, seed: int | None) -> str | None:
        if init is None:
            return None
        source, name = split_init(init)
        target = ref(source, name, seed)
        return target if source == "pretrain" else f"{source}/{target}"

    for stage in STAGES:
        if stage not in config:
            continue
        runs: dict[str, Any] = {}
        for name, spec in (config.get(stage) or {}).items():
            base = {k: v for k, v in spec.items() if k != "seeds"}
            if not seeds[(stage, name)]:
                runs[name] = {**base, "init": init_of(spec.get("init"), None)}
                continue
            if "seed" in (spec.get("set") or {}):
                raise ConfigMatrixError(
                    f"{stage}.{name}: give either seeds: (one run per seed) or set: {{seed: ...}}"
                )
            for seed in seeds[(stage, name)]:
                if seed_run_name(name, seed) in (config.get(stage) or {}):
                    raise ConfigMatrixError(
                        f"{stage}.{name}: seed {seed} makes run {seed_run_name(name, seed)!r}, "
                        "which the config also names; rename one of them"
                    )
                runs[seed_run_name(name, seed)] = {
                    **base,
                    "init": init_of(spec.get("init"), seed),
                    "seed": seed,
                    "seed_group": name,
                }
        out[stage] = runs
    if "analysis" in config:
        out["analysis"] = {
            figure: {
                **spec,
                "models": {
                    label: m
                    if m == "random"
                    else "/".join((m.split("/")[0], ref(*m.split("/"), None)))
                    for label, m in spec["models"].items()
                },
            }
            for figure, spec in (config.get("analysis") or {}).items()
        }
    return out


def name_pattern(names: Iterable[str]) -> str:
    """A wildcard constraint matching exactly ``names`` (nothing when empty)."""
    names = list(names)
    return "|".join(re.escape(n) for n in names) if names else "(?!)"


def _sets(values: Mapping[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in values.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args

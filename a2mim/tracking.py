"""Experiment tracking with MLflow: the only module that imports ``mlflow``.

One MLflow run per stage run directory. The store defaults to ``sqlite:///<results>/mlflow.db``
with artifacts under ``<results>/mlartifacts``; a config value (``uri=``), then the environment
(``A2MIM_TRACKING_URI``, then ``MLFLOW_TRACKING_URI``) override it, e.g. for a cluster server.

Concurrency. Two processes that create a fresh sqlite store at once crash ("duplicate column
name"), so :func:`ensure_store` creates or migrates the store, and the experiment, under an
exclusive ``fcntl.flock`` on ``<db folder>/.mlflow.lock``; every :class:`Tracker` calls it, and the
workflow may call it once before it starts parallel jobs. Several writers on one sqlite store are
slow (tens of ms per write), so metrics are buffered and sent with ``MlflowClient.log_batch``
every ``flush_every`` metrics or ``flush_seconds`` seconds, and at :meth:`Tracker.flush` /
:meth:`Tracker.close`.

Resume. The run id is written (atomically) to ``<out_dir>/mlflow_run_id``; a Tracker opened on a
directory that holds one continues that run and its step axis. Every flush also sets the run tag
``a2mim.last_logged_step`` (after the metrics it covers), and a flush only sends *complete*
steps: a buffered step is sent once a later step is logged, or at ``flush()`` / ``close()``. A
resumed Tracker drops every metric whose step is ``<=`` that tag, because a stage resumed from a
checkpoint at step C recomputes steps C+1.. that may already be in the store; steps after the tag
are logged. So a run resumed any number of times holds each (key, step) once, provided that

- all metrics of a run share one step axis (the global optimisation step; per-epoch metrics are
  logged at the step that ends the epoch) and a process logs steps in non-decreasing order;
- the stage calls :meth:`Tracker.flush` just before it writes a checkpoint, so every step the
  checkpoint covers is in the store before a later crash can lose the buffer.

The one window left is a crash between the metrics and the tag of one flush (MLflow writes them
in two transactions): the steps of that flush are then logged again on resume.

Only rank 0 logs: a Tracker with ``enabled=False`` does nothing at all (no import of mlflow, no
store, no files).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import posixpath
import re
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from a2mim import atomic

ENV_URI = "A2MIM_TRACKING_URI"
ENV_MLFLOW_URI = "MLFLOW_TRACKING_URI"
DEFAULT_EXPERIMENT = "a2mim"
DB_NAME = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
LOCK_NAME = ".mlflow.lock"
RUN_ID_FILE = "mlflow_run_id"
LAST_STEP_TAG = "a2mim.last_logged_step"
# MLflow's limits (mlflow.utils.validation): per log_batch call and per value.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 999  # 1000 entities per call, one kept for the last-step tag
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
MAX_KEY_LENGTH = 250
TRUNCATION_MARKER = "...[truncated]"
RUN_TAGS = ("stage", "method", "backbone", "preset", "scale", "config_hash", "git_commit")

Status = Literal["FINISHED", "FAILED", "KILLED"]
_KEY_RE = re.compile(r"^[/\w.\- :]+$")
_PREPARED: set[str] = set()  # sqlite stores (and experiments) this process already prepared


class TrackingError(RuntimeError):
    """A tracking store or run that cannot be used as asked; the message says how to fix it."""


# ---------------------------------------------------------------------------------------------
# Store: where it is, and creating it once


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for any other URI (or in-memory)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///")
    if not path or path == ":memory:":
        return None
    return Path(path)


def _sqlite_uri(db_path: Path) -> str:
    return "sqlite:///" + str(db_path.resolve())


def resolve_uri(uri: str | None = None, results_dir: str | Path | None = None) -> str:
    """The tracking URI to use: ``uri`` (a config value), else ``$A2MIM_TRACKING_URI``, else
    ``$MLFLOW_TRACKING_URI``, else the default store of ``results_dir`` (see
    :func:`ensure_store`). A relative sqlite path is made absolute (relative to the current
    folder), so processes that change folder still share one store."""
    for candidate in (uri, os.environ.get(ENV_URI), os.environ.get(ENV_MLFLOW_URI)):
        if candidate:
            db = _sqlite_path(candidate)
            return _sqlite_uri(db) if db is not None else candidate
    if results_dir is None:
        raise TrackingError(
            "no tracking URI: pass uri= (tracking.uri in the config), set "
            f"{ENV_URI}, or give results_dir= for the default sqlite store"
        )
    return _sqlite_uri(Path(results_dir) / DB_NAME)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive ``flock`` on ``path`` (created if missing) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _open_sqlite_store(uri: str, artifact_root: Path):
    """A ``SqlAlchemyStore`` on ``uri``, created if needed; must run under the store's lock.

    MLflow itself migrates a store that lacks tables of this release (the usual case for a store
    an older MLflow wrote); a store whose tables exist but whose schema version is older raises
    TrackingError saying to run ``mlflow db upgrade``. The store's default artifact root is
    ``artifact_root``, so even MLflow's "Default" experiment keeps its artifacts beside the
    database."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    try:
        return SqlAlchemyStore(uri, str(artifact_root))
    except MlflowException as exc:
        if "mlflow db upgrade" not in str(exc):
            raise
        raise TrackingError(
            f"the MLflow store {uri} has an older schema than MLflow {_mlflow_version()}: back "
            f"it up, then run `mlflow db upgrade {uri}` once (with no job using it)"
        ) from None


def _mlflow_version() -> str:
    import mlflow

    return mlflow.__version__


def _prepare_sqlite(db_path: Path, experiment: str | None) -> str:
    """Create/migrate the sqlite store at ``db_path`` and ``experiment`` once, under a lock."""
    uri = _sqlite_uri(db_path)
    key = f"{uri}#{experiment}"
    if key in _PREPARED:
        return uri
    folder = db_path.resolve().parent
    artifact_root = folder / ARTIFACT_DIR
    with _file_lock(folder / LOCK_NAME):
        store = _open_sqlite_store(uri, artifact_root)
        if experiment is not None and store.get_experiment_by_name(experiment) is None:
            # The store puts its artifacts at <artifact_root>/<experiment id>, like mlflow server.
            store.create_experiment(experiment)
    _PREPARED.add(key)
    _PREPARED.add(f"{uri}#None")
    return uri


def ensure_store(results_dir: str | Path, experiment: str | None = DEFAULT_EXPERIMENT) -> str:
    """Create or migrate the default store ``<results_dir>/mlflow.db`` (and ``experiment``, with
    artifacts under ``<results_dir>/mlartifacts``) and return its URI.

    Safe to call from several processes at once, also on a fresh folder: the work happens under
    an exclusive ``flock`` on ``<results_dir>/.mlflow.lock``; later calls only check the schema.
    """
    return _prepare_sqlite(Path(results_dir) / DB_NAME, experiment)


def _experiment_id(client, uri: str, experiment: str) -> str:
    """The id of ``experiment`` in the store at ``uri``, created if missing."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        from mlflow.exceptions import MlflowException

        try:
            # A server (or other store) chooses its own artifact location.
            return client.create_experiment(experiment)
        except MlflowException:
            found = client.get_experiment_by_name(experiment)  # created meanwhile by another job
            if found is None:
                raise
    if found.lifecycle_stage != "active":
        raise TrackingError(
            f"MLflow experiment {experiment!r} in {uri} is deleted: restore it "
            f"(mlflow experiments restore --experiment-id {found.experiment_id}) or use another "
            "experiment name"
        )
    return found.experiment_id


# ---------------------------------------------------------------------------------------------
# Params and tags


def _check_key(key: str, what: str) -> str:
    """Raise ValueError unless ``key`` is a name MLflow accepts for a metric/param."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(
            f"{what} name {key!r} is not valid for MLflow: use letters, digits, '_', '-', '.', "
            "' ', ':' and '/' only"
        )
    norm = posixpath.normpath(key)
    if norm != key or norm == "." or norm.startswith(("..", "/")):
        raise ValueError(f"{what} name {key!r} is not a normalised path (no '//', '..', '/...')")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"{what} name {key[:60]!r}... is longer than {MAX_KEY_LENGTH} characters")
    return key


def truncate(value: str, limit: int) -> str:
    """``value`` cut to at most ``limit`` characters, ending with ``TRUNCATION_MARKER`` if cut."""
    if len(value) <= limit:
        return value
    return value[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def _param_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return json.dumps(value, default=str)
    if isinstance(value, Mapping):  # only reached for an empty mapping
        return "{}"
    return str(value)


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, string values of at most 6000 chars.

    ``{"optim": {"lr": 0.1, "betas": (0.9, 0.95)}, "model": {"overrides": {}}}`` gives
    ``{"optim.lr": "0.1", "optim.betas": "[0.9, 0.95]", "model.overrides": "{}"}``. Lists and
    tuples become JSON text, other leaves ``str(value)``; a value longer than MLflow's limit ends
    with ``TRUNCATION_MARKER``. Raises ValueError on keys MLflow rejects or that collide after
    flattening (``{"a.b": 1, "a": {"b": 2}}``).
    """
    flat: dict[str, str] = {}

    def visit(node: Mapping[str, Any], path: str) -> None:
        for raw_key, value in node.items():
            key = f"{path}.{raw_key}" if path else str(raw_key)
            if isinstance(value, Mapping) and value:
                visit(value, key)
                continue
            _check_key(key, "param")
            if key in flat:
                raise ValueError(f"param {key!r} appears twice after flattening the config")
            flat[key] = truncate(_param_text(value), MAX_PARAM_LENGTH)

    visit(config, prefix)
    return flat


def git_commit(path: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` of the repository holding ``path`` (default: this package), or
    ``"unknown"`` when git or a repository is not available."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else "unknown"


def _tag_text(tags: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): truncate(str(v), MAX_TAG_LENGTH) for k, v in tags.items()}


# ---------------------------------------------------------------------------------------------
# The run


class Tracker:
    """One MLflow run for one stage run directory; a context manager.

    Args:
        out_dir: the stage's run directory; holds ``mlflow_run_id`` so a restart continues the run.
        stage: tag ``stage`` (``pretrain``, ``finetune``, ...).
        tags: further run tags, by convention ``method``, ``backbone``, ``preset``, ``scale``,
            ``config_hash`` (see ``RUN_TAGS``); ``git_commit`` is added when missing.
        params: the resolved config (nested); logged flattened (:func:`flatten_params`).
        uri: tracking URI from the config; None: environment, then the default store.
        experiment: MLflow experiment name (created when missing).
        enabled: False on ranks other than 0: every method then does nothing.
        flush_every / flush_seconds: send buffered metrics once this many are buffered or this
            long after the last send (checked when a later step is logged).
        results_dir: folder of the default store; None: the nearest ancestor of ``out_dir`` named
            ``results``, else ``out_dir``'s parent.
    """

    def __init__(
        self,
        out_dir: str | Path,
        stage: str,
        tags: Mapping[str, Any],
        params: Mapping[str, Any],
        uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        enabled: bool = True,
        flush_every: int = 50,
        flush_seconds: float = 10.0,
        results_dir: str | Path | None = None,
    ) -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.stage = stage
        self.run_id: str | None = None
        self.uri: str | None = None
        self.resumed = False
        self.last_logged_step: int | None = None  # resume boundary (the run's tag)
        self.skipped = 0  # metrics dropped because their step was already logged
        self.flush_every = max(1, int(flush_every))
        self.flush_seconds = float(flush_seconds)
        self._buffer: list = []  # mlflow.entities.Metric
        self._buffer_step: int | None = None  # highest step in the buffer
        self._sent_step: int | None = None  # highest step sent in this process
        self._last_flush = time.monotonic()
        self._closed = False
        if not enabled:
            return

        from mlflow import MlflowClient

        if results_dir is None:
            results_dir = _default_results_dir(self.out_dir)
        self.uri = resolve_uri(uri, results_dir)
        db = _sqlite_path(self.uri)
        if db is not None:  # before MlflowClient, whose constructor already opens the store
            _prepare_sqlite(db, experiment)
        self._client = MlflowClient(tracking_uri=self.uri)
        experiment_id = _experiment_id(self._client, self.uri, experiment)

        all_tags = {**tags, "stage": stage, "out_dir": str(self.out_dir.resolve())}
        all_tags.setdefault("git_commit", git_commit())
        flat = flatten_params(params)
        run_file = self.out_dir / RUN_ID_FILE
        if run_file.exists():
            self._resume(run_file, experiment_id, all_tags, flat)
        else:
            run = self._client.create_run(
                experiment_id, tags=_tag_text(all_tags), run_name=f"{stage}:{self.out_dir.name}"
            )
            self.run_id = run.info.run_id
            atomic.write_text(run_file, self.run_id + "\n")
            self._log_params(flat, existing={})

    # -- creation and resume ------------------------------------------------------------------

    def _resume(
        self, run_file: Path, experiment_id: str, tags: dict[str, Any], flat: dict[str, str]
    ) -> None:
        from mlflow.exceptions import MlflowException

        run_id = run_file.read_text().strip()
        fix = f"delete {run_file} to start a new MLflow run, or point the tracking URI at the store"
        try:
            run = self._client.get_run(run_id)
        except MlflowException:
            raise TrackingError(
                f"{run_file} names MLflow run {run_id!r}, which is not in {self.uri}: {fix} "
                "that holds it"
            ) from None
        if run.info.lifecycle_stage != "active" or run.info.experiment_id != experiment_id:
            raise TrackingError(
                f"{run_file} names MLflow run {run_id!r}, which is deleted or belongs to another "
                f"experiment (id {run.info.experiment_id}, expected {experiment_id}): {fix}"
            )
        self.run_id = run_id
        self.resumed = True
        self._check_params(flat, run.data.params)
        old_tags = run.data.tags
        if LAST_STEP_TAG in old_tags:
            self.last_logged_step = int(old_tags[LAST_STEP_TAG])
        old_commit = old_tags.get("git_commit")
        if old_commit is not None and old_commit != tags["git_commit"]:
            warnings.warn(
                f"resuming MLflow run {run_id} (started at commit {old_commit}) at commit "
                f"{tags['git_commit']}; the new commit is tagged git_commit_resumed",
                stacklevel=3,
            )
            tags["git_commit_resumed"] = tags.pop("git_commit")
        self._client.update_run(run_id, status="RUNNING")
        self.set_tags(tags)
        self._log_params(flat, existing=run.data.params)

    def _check_params(self, flat: dict[str, str], existing: Mapping[str, str]) -> None:
        changed = [k for k, v in flat.items() if k in existing and existing[k] != v]
        if changed:
            k = changed[0]
            raise TrackingError(
                f"MLflow run {self.run_id} (from {self.out_dir / RUN_ID_FILE}) was logged with "
                f"{k}={existing[k]!r}, the config now says {flat[k]!r} ({len(changed)} params "
                "differ): use another out dir for a changed config"
            )

    def _log_params(self, flat: dict[str, str], existing: Mapping[str, str]) -> None:
        """Log the params of ``flat`` that the run does not hold yet, 100 per call."""
        from mlflow.entities import Param

        todo = [Param(k, v) for k, v in flat.items() if k not in existing]
        for i in range(0, len(todo), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=todo[i : i + MAX_PARAMS_PER_BATCH])

    # -- logging --------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Buffer ``metrics`` (name -> number) at ``step`` (the global optimisation step).

        Metrics at a step ``<= last_logged_step`` of a resumed run are dropped (already in the
        store). Raises ValueError for names MLflow rejects and values that are not numbers."""
        if not self.enabled:
            return
        self._check_open()
        if isinstance(step, bool) or int(step) != step:
            raise ValueError(f"metric step must be an integer, got {step!r}")
        step = int(step)
        if self.last_logged_step is not None and step <= self.last_logged_step:
            self.skipped += len(metrics)
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            _check_key(key, "metric")
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"metric {key!r} at step {step} is not a number: {value!r}"
                ) from None
            batch.append(Metric(key, number, stamp, step))
        if self._buffer and step > self._buffer_step and self._due():
            self._flush(attempts=2, strict=False)  # the buffer holds complete steps only
        self._buffer.extend(batch)
        if batch:
            self._buffer_step = step if self._buffer_step is None else max(self._buffer_step, step)

    def _due(self) -> bool:
        return (
            len(self._buffer) >= self.flush_every
            or time.monotonic() - self._last_flush >= self.flush_seconds
        )

    def flush(self) -> None:
        """Send every buffered metric now (call it just before writing a checkpoint). A store
        that stays unreachable only warns: the metrics stay buffered for the next flush."""
        if self.enabled and not self._closed:
            self._flush(attempts=5, strict=False)

    def _flush(self, attempts: int, strict: bool) -> None:
        """Send the buffer with ``log_batch``, trying ``attempts`` times (a busy sqlite file, a
        server hiccup). Then a failure raises TrackingError if ``strict``, else it warns and
        keeps the buffer for the next flush. Invalid metrics raise at once."""
        if not self._buffer:
            return
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException

        top = max(self._buffer_step, self._sent_step if self._sent_step is not None else -1)
        for attempt in range(attempts):
            try:
                # Chunks are sent in order; an exact retry of a chunk already stored is ignored
                # by MLflow (same key, step, timestamp and value).
                while self._buffer:
                    chunk = self._buffer[:MAX_METRICS_PER_BATCH]
                    last = len(chunk) == len(self._buffer)
                    tags = [RunTag(LAST_STEP_TAG, str(top))] if last else []
                    self._client.log_batch(self.run_id, metrics=chunk, tags=tags)
                    del self._buffer[: len(chunk)]
                break
            except MlflowException as exc:
                if exc.error_code == "INVALID_PARAMETER_VALUE":
                    raise
                error: Exception = exc
            except Exception as exc:  # a locked sqlite file, an unreachable server
                error = exc
            if attempt + 1 < attempts:
                time.sleep(0.2 * 2**attempt)
        else:
            message = (
                f"MLflow run {self.run_id}: could not send {len(self._buffer)} metrics to "
                f"{self.uri} ({type(error).__name__}: {error})"
            )
            if strict:
                raise TrackingError(message + "; they are not in MLflow")
            warnings.warn(message + "; keeping them for the next flush", stacklevel=3)
            self._last_flush = time.monotonic()
            return
        self._sent_step = top
        self._buffer_step = None
        self._last_flush = time.monotonic()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file, or a folder's contents, into the run's artifacts (under
        ``artifact_path``)."""
        if not self.enabled:
            return
        self._check_open()
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            self._client.log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise FileNotFoundError(f"artifact to log does not exist: {path}")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) run tags; values become text of at most 8000 characters."""
        if not self.enabled:
            return
        self._check_open()
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in _tag_text(tags).items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=items[i : i + MAX_PARAMS_PER_BATCH])

    def close(self, status: Status = "FINISHED") -> None:
        """Send the buffer and mark the run ``status``; later calls do nothing."""
        if not self.enabled or self._closed:
            return
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"run status must be FINISHED, FAILED or KILLED, got {status!r}")
        try:
            self._flush(attempts=5, strict=True)
        finally:
            self._closed = True
            self._client.set_terminated(self.run_id, status)

    def _check_open(self) -> None:
        if self._closed:
            raise TrackingError(f"MLflow run {self.run_id} is closed; open a new Tracker")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("FINISHED")
            return
        from a2mim.train.preemption import Preempted

        # Stopped from outside (Ctrl-C, SIGTERM, a preemption or time limit that saved and will
        # resume): KILLED; anything else the stage raised: FAILED.
        stopped = issubclass(exc_type, KeyboardInterrupt | SystemExit | Preempted)
        status: Status = "KILLED" if stopped else "FAILED"
        try:
            self.close(status)
        except Exception as close_error:  # keep the original exception
            warnings.warn(f"closing MLflow run {self.run_id} failed: {close_error}", stacklevel=2)


def _default_results_dir(out_dir: Path) -> Path:
    resolved = out_dir.resolve()
    for parent in resolved.parents:
        if parent.name == "results":
            return parent
    return resolved.parent


# ---------------------------------------------------------------------------------------------
# Reading runs back (for the tables)


def query_runs(
    uri: str, experiment: str = DEFAULT_EXPERIMENT, filter_string: str = ""
) -> list[dict[str, Any]]:
    """Active runs of ``experiment`` at ``uri``, oldest first, as plain dicts::

        {"run_id", "run_name", "status", "start_time", "end_time" (ms since the epoch or None),
         "artifact_uri", "tags": {...} (without MLflow's own ``mlflow.*``),
         "params": {...}, "metrics": {name: latest value}}

    ``filter_string`` is MLflow's search syntax, e.g. ``"tags.stage = 'pretrain'"``. Reading
    never creates a store: a sqlite URI whose file is missing raises TrackingError, as does an
    unknown experiment.
    """
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    db = _sqlite_path(uri)
    if db is not None and not db.is_file():
        raise TrackingError(f"no MLflow store at {db}: run a stage first or fix the tracking URI")
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise TrackingError(f"no MLflow experiment {experiment!r} in {uri} (it has {names})")
    rows: list[dict[str, Any]] = []
    token = None
    while True:
        page = client.search_runs(
            [found.experiment_id],
            filter_string=filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        for run in page:
            info, data = run.info, run.data
            rows.append(
                {
                    "run_id": info.run_id,
                    "run_name": info.run_name,
                    "status": info.status,
                    "start_time": info.start_time,
                    "end_time": info.end_time,
                    "artifact_uri": info.artifact_uri,
                    "tags": {k: v for k, v in data.tags.items() if not k.startswith("mlflow.")},
                    "params": dict(data.params),
                    "metrics": dict(data.metrics),
                }
            )
        token = page.token
        if not token:
            return rows


def download_artifact(uri: str, run_id: str, path: str, dst_dir: str | Path) -> Path | None:
    """Copy the artifact file ``path`` (e.g. ``predictions/final.npz``) of run ``run_id`` at
    ``uri`` into ``dst_dir``; returns the local file, or None when the run has no such
    artifact."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    folder = posixpath.dirname(path) or None
    if path not in {a.path for a in client.list_artifacts(run_id, folder)}:
        return None
    Path(dst_dir).mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(dst_dir)))


__all__ = [
    "RUN_TAGS",
    "Tracker",
    "TrackingError",
    "download_artifact",
    "ensure_store",
    "flatten_params",
    "git_commit",
    "query_runs",
    "resolve_uri",
    "truncate",
]

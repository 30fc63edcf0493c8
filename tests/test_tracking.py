"""Tests of a2mim.tracking against a real MLflow sqlite store.

One store, created by four processes racing on ``ensure_store``, is shared by the module; other
tests make their own only where the test is about store location. Worker processes use the
``spawn`` start method, as SLURM/submitit jobs start fresh interpreters.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from a2mim import tracking

KEYS = ("loss", "loss_spatial", "loss_freq", "lr")


def _value(worker: int, key: str, step: int) -> float:
    return worker * 1000.0 + KEYS.index(key) * 100.0 + step / 7.0


@pytest.fixture(autouse=True)
def _no_uri_env(monkeypatch):
    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    monkeypatch.delenv(tracking.ENV_MLFLOW_URI, raising=False)


# -- worker processes (module level so that spawn can import them) ------------------------------


def _race_store(barrier, results_dir: str, queue) -> None:
    import mlflow  # noqa: F401  (import before the barrier: the race is on the store, not imports)

    barrier.wait()
    queue.put(tracking.ensure_store(results_dir))


def _write_metrics(barrier, uri: str, out_dir: str, worker: int, steps: int) -> None:
    tracker = tracking.Tracker(
        out_dir,
        "pretrain",
        {"method": "a2mim", "worker": worker},
        {"seed": worker},
        uri=uri,
        flush_every=20,
        flush_seconds=1e9,
    )
    barrier.wait()
    with tracker:
        for step in range(1, steps + 1):
            tracker.log_metrics({k: _value(worker, k, step) for k in KEYS}, step)


def _crash_after(uri: str, out_dir: str, checkpoint_step: int, crash_step: int) -> None:
    """Log steps 1..crash_step, flushing at the checkpoint, then die without closing."""
    tracker = tracking.Tracker(
        out_dir, "pretrain", {}, {"seed": 0}, uri=uri, flush_every=8, flush_seconds=1e9
    )
    for step in range(1, crash_step + 1):
        tracker.log_metrics({k: _value(0, k, step) for k in KEYS}, step)
        if step == checkpoint_step:
            tracker.flush()
    os._exit(3)


def _spawn(target, args_list: list[tuple], timeout: float = 120.0) -> list[int | None]:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    return [p.exitcode for p in procs]


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raced_store(tmp_path_factory):
    """A fresh results folder whose store four processes created at the same moment."""
    results = tmp_path_factory.mktemp("store") / "results"
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    codes = _spawn(_race_store, [(barrier, str(results), queue)] * 4)
    uris = [queue.get(timeout=5) for code in codes if code == 0]
    return results, codes, uris


@pytest.fixture(scope="module")
def store(raced_store) -> tuple[Path, str]:
    results, codes, uris = raced_store
    if codes != [0] * 4:
        pytest.fail(f"store creation failed in a worker: exit codes {codes}")
    return results, uris[0]


@pytest.fixture(scope="module")
def client(store):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store[1])


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# -- the store -----------------------------------------------------------------------------------


def test_store_created_by_four_processes_at_once(raced_store, client):
    results, codes, uris = raced_store
    assert codes == [0, 0, 0, 0]
    assert uris == [f"sqlite:///{results.resolve()}/mlflow.db"] * 4
    assert (results / "mlflow.db").is_file() and (results / ".mlflow.lock").is_file()
    experiments = {e.name: e for e in client.search_experiments()}
    assert set(experiments) == {"Default", "a2mim"}  # created once, not four times
    for exp in experiments.values():
        assert exp.artifact_location == f"{results.resolve()}/mlartifacts/{exp.experiment_id}"


def test_four_concurrent_writers_lose_no_metric(store, client, tmp_path):
    _, uri = store
    steps = 50  # x 4 keys = 200 metrics per process, 10 log_batch calls each
    barrier = mp.get_context("spawn").Barrier(4)
    out = [tmp_path / f"run{w}" for w in range(4)]
    codes = _spawn(_write_metrics, [(barrier, uri, str(out[w]), w, steps) for w in range(4)])
    assert codes == [0, 0, 0, 0]
    run_ids = [(d / "mlflow_run_id").read_text().strip() for d in out]
    assert len(set(run_ids)) == 4
    for w, run_id in enumerate(run_ids):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["worker"] == str(w)
        assert run.data.tags[tracking.LAST_STEP_TAG] == str(steps)
        for key in KEYS:
            history = client.get_metric_history(run_id, key)
            assert sorted(m.step for m in history) == list(range(1, steps + 1))
            assert all(m.value == pytest.approx(_value(w, key, m.step)) for m in history)


def test_resume_after_crash_continues_run_and_step_axis(store, client, tmp_path):
    _, uri = store
    out = tmp_path / "pretrain"
    assert _spawn(_crash_after, [(uri, str(out), 20, 30)]) == [3]
    run_id = (out / "mlflow_run_id").read_text().strip()
    # flush_every=8 (two steps): steps 29-30 were still buffered when the process died
    assert _steps(client, run_id, "loss") == list(range(1, 29))
    assert client.get_run(run_id).info.status == "RUNNING"

    # the restarted stage resumes from its checkpoint at step 20 and recomputes 21..
    with tracking.Tracker(out, "pretrain", {}, {"seed": 0}, uri=uri, flush_every=8) as tracker:
        assert (tracker.run_id, tracker.resumed, tracker.last_logged_step) == (run_id, True, 28)
        for step in range(21, 41):
            tracker.log_metrics({k: _value(0, k, step) for k in KEYS}, step)
    assert tracker.skipped == 8 * len(KEYS)  # steps 21..28 were in the store already
    for key in KEYS:
        assert _steps(client, run_id, key) == list(range(1, 41))  # each step once
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.LAST_STEP_TAG] == "40"
    assert len(client.search_runs([run.info.experiment_id], f"tags.out_dir = '{out}'")) == 1


def test_resume_with_changed_config_or_unknown_run_is_refused(store, client, tmp_path):
    _, uri = store
    out = tmp_path / "run"
    tracking.Tracker(out, "finetune", {}, {"optim": {"lr": 0.1}}, uri=uri).close()
    with pytest.raises(tracking.TrackingError, match=r"optim\.lr='0\.1'.*'0\.2'"):
        tracking.Tracker(out, "finetune", {}, {"optim": {"lr": 0.2}}, uri=uri)
    run_id = (out / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "FINISHED"  # the refused resume left it alone
    (out / "mlflow_run_id").write_text("0123456789abcdef0123456789abcdef\n")
    with pytest.raises(tracking.TrackingError, match="mlflow_run_id"):
        tracking.Tracker(out, "finetune", {}, {"optim": {"lr": 0.1}}, uri=uri)


def test_buffering_sends_complete_steps_in_batches(store, client, tmp_path):
    _, uri = store
    tracker = tracking.Tracker(tmp_path / "r", "pretrain", {}, {}, uri=uri, flush_every=6)
    for step in (1, 2, 3):
        tracker.log_metrics({"a": step, "b": -step}, step)
    assert _steps(client, tracker.run_id, "a") == []  # 6 buffered, step 3 may still grow
    tracker.log_metrics({"c": 0.5}, 3)  # same step, later call
    tracker.log_metrics({"a": 4}, 4)  # a new step: the complete steps 1-3 go out
    assert _steps(client, tracker.run_id, "a") == [1, 2, 3]
    assert _steps(client, tracker.run_id, "c") == [3]
    tracker.close()
    assert _steps(client, tracker.run_id, "a") == [1, 2, 3, 4]
    assert client.get_run(tracker.run_id).data.tags[tracking.LAST_STEP_TAG] == "4"
    with pytest.raises(tracking.TrackingError, match="closed"):
        tracker.log_metrics({"a": 5}, 5)


def test_unreachable_store_keeps_the_buffer_until_it_is_back(store, client, tmp_path, monkeypatch):
    _, uri = store
    tracker = tracking.Tracker(tmp_path / "r", "pretrain", {}, {}, uri=uri, flush_every=1)
    real_log_batch = tracker._client.log_batch

    def unreachable(*args, **kwargs):
        raise ConnectionError("store down")

    monkeypatch.setattr(tracking.time, "sleep", lambda seconds: None)  # no back-off waits
    monkeypatch.setattr(tracker._client, "log_batch", unreachable)
    tracker.log_metrics({"loss": 1.0}, 1)
    with pytest.warns(UserWarning, match="could not send 1 metrics.*store down"):
        tracker.log_metrics({"loss": 2.0}, 2)  # step 1 is due, the store is down
    with pytest.warns(UserWarning, match="could not send 2 metrics"):
        tracker.flush()
    monkeypatch.setattr(tracker._client, "log_batch", real_log_batch)
    tracker.flush()
    assert _steps(client, tracker.run_id, "loss") == [1, 2]
    tracker.log_metrics({"loss": 3.0}, 3)
    monkeypatch.setattr(tracker._client, "log_batch", unreachable)
    with pytest.raises(tracking.TrackingError, match="could not send 1 metrics"):
        tracker.close()  # at the end a loss is an error
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_bad_metrics_are_refused_when_logged(store, tmp_path):
    _, uri = store
    with tracking.Tracker(tmp_path / "r", "pretrain", {}, {}, uri=uri) as tracker:
        with pytest.raises(ValueError, match="not a number"):
            tracker.log_metrics({"loss": "high"}, 1)
        with pytest.raises(ValueError, match="not valid"):
            tracker.log_metrics({"loss?": 1.0}, 1)
        with pytest.raises(ValueError, match="integer"):
            tracker.log_metrics({"loss": 1.0}, 1.5)


def test_failure_in_context_marks_run_failed(store, client, tmp_path):
    _, uri = store
    with (
        pytest.raises(RuntimeError, match="boom"),
        tracking.Tracker(tmp_path / "r", "pretrain", {}, {}, uri=uri) as tracker,
    ):
        tracker.log_metrics({"loss": 1.0}, 1)
        raise RuntimeError("boom")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert _steps(client, tracker.run_id, "loss") == [1]  # the buffer was still sent


# -- params, tags, artifacts, queries ----------------------------------------------------------


def test_flatten_params_golden():
    config = {
        "model": {"preset": "a2mim_resnet50", "overrides": {}},
        "optim": {"lr": 1.5e-4, "betas": (0.9, 0.999), "grad_clip": None},
        "epochs": 100,
        "amp": True,
    }
    assert tracking.flatten_params(config) == {
        "model.preset": "a2mim_resnet50",
        "model.overrides": "{}",
        "optim.lr": "0.00015",
        "optim.betas": "[0.9, 0.999]",
        "optim.grad_clip": "None",
        "epochs": "100",
        "amp": "True",
    }
    with pytest.raises(ValueError, match=r"'a\.b' appears twice"):
        tracking.flatten_params({"a.b": 1, "a": {"b": 2}})
    with pytest.raises(ValueError, match="not valid"):
        tracking.flatten_params({"a": {"b=c": 1}})


def test_truncation_keeps_mlflow_limit_and_marks_the_cut():
    exact = "x" * 6000
    assert tracking.flatten_params({"p": exact}) == {"p": exact}
    cut = tracking.flatten_params({"p": "y" * 6001})["p"]
    assert len(cut) == 6000
    assert cut == "y" * (6000 - len(tracking.TRUNCATION_MARKER)) + tracking.TRUNCATION_MARKER
    assert tracking.truncate("abc", 3) == "abc"


def test_params_tags_and_artifacts_land_in_the_store(store, client, tmp_path, monkeypatch):
    results, uri = store
    monkeypatch.chdir(tmp_path)  # MLflow's fallback would be ./mlruns here
    params = {"group": {f"p{i:03d}": i for i in range(250)}, "long": "z" * 7000}  # 3 batches
    tags = {"method": "a2mim", "backbone": "resnet18", "preset": "a2mim_resnet18"}
    tags |= {"scale": "tiny", "config_hash": "abc123"}
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "recon_ep0001.png").write_bytes(b"png")
    (tmp_path / "resolved_config.yaml").write_text("epochs: 1\n")
    with tracking.Tracker(tmp_path / "out", "pretrain", tags, params, uri=uri) as tracker:
        tracker.log_artifact(tmp_path / "resolved_config.yaml")
        tracker.log_artifact(tmp_path / "figures", "figures")
        tracker.set_tags({"final": 1})
        with pytest.raises(FileNotFoundError, match=r"missing\.png"):
            tracker.log_artifact(tmp_path / "missing.png")
    run = client.get_run(tracker.run_id)
    assert run.data.params == tracking.flatten_params(params)
    assert len(run.data.params) == 251
    assert run.data.params["long"].endswith(tracking.TRUNCATION_MARKER)
    for key in tracking.RUN_TAGS:
        assert key in run.data.tags
    assert run.data.tags["stage"] == "pretrain" and run.data.tags["final"] == "1"
    assert run.data.tags["git_commit"] == tracking.git_commit()
    assert run.info.run_name == "pretrain:out"
    art = Path(run.info.artifact_uri)
    assert art.is_relative_to(results.resolve() / "mlartifacts")
    assert (art / "resolved_config.yaml").read_text() == "epochs: 1\n"
    assert (art / "figures" / "recon_ep0001.png").read_bytes() == b"png"
    assert not (tmp_path / "mlruns").exists()


def test_query_runs_returns_tags_params_and_latest_metrics(store, tmp_path):
    _, uri = store
    with tracking.Tracker(
        tmp_path / "lin", "linprobe", {"method": "a2mim"}, {"epochs": 3}, uri=uri
    ) as tracker:
        tracker.log_metrics({"top1": 10.0}, 1)
        tracker.log_metrics({"top1": 42.5}, 2)
    rows = tracking.query_runs(uri, filter_string="tags.stage = 'linprobe'")
    assert len(rows) == 1
    row = rows[0]
    assert row["run_id"] == tracker.run_id and row["status"] == "FINISHED"
    assert row["tags"]["method"] == "a2mim" and row["tags"]["stage"] == "linprobe"
    assert not any(k.startswith("mlflow.") for k in row["tags"])
    assert row["params"] == {"epochs": "3"}
    assert row["metrics"] == {"top1": 42.5}
    with pytest.raises(tracking.TrackingError, match="no MLflow experiment 'nope'"):
        tracking.query_runs(uri, experiment="nope")
    missing = tmp_path / "none" / "mlflow.db"
    with pytest.raises(tracking.TrackingError, match="no MLflow store"):
        tracking.query_runs(f"sqlite:///{missing}")
    assert not missing.parent.exists()


# -- where the store is ---------------------------------------------------------------------------


def test_resolve_uri_precedence(monkeypatch, tmp_path):
    default = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.resolve_uri(None, tmp_path) == default
    monkeypatch.setenv(tracking.ENV_MLFLOW_URI, "http://mlflow-b:5000")
    assert tracking.resolve_uri(None, tmp_path) == "http://mlflow-b:5000"
    monkeypatch.setenv(tracking.ENV_URI, "http://mlflow-a:5000")
    assert tracking.resolve_uri(None, tmp_path) == "http://mlflow-a:5000"
    assert tracking.resolve_uri("http://config:5000", tmp_path) == "http://config:5000"
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_uri("sqlite:///rel/x.db") == f"sqlite:///{tmp_path.resolve()}/rel/x.db"
    monkeypatch.delenv(tracking.ENV_URI)
    monkeypatch.delenv(tracking.ENV_MLFLOW_URI)
    with pytest.raises(tracking.TrackingError, match="A2MIM_TRACKING_URI"):
        tracking.resolve_uri(None, None)


def test_env_uri_overrides_the_default_store(monkeypatch, tmp_path):
    other = tmp_path / "server" / "other.db"
    monkeypatch.setenv(tracking.ENV_URI, f"sqlite:///{other}")
    out = tmp_path / "results" / "runs" / "x"
    with tracking.Tracker(out, "pretrain", {}, {}) as tracker:
        tracker.log_metrics({"loss": 1.0}, 1)
    assert tracker.uri == f"sqlite:///{other.resolve()}"
    assert other.is_file()
    assert not (tmp_path / "results" / "mlflow.db").exists()
    rows = tracking.query_runs(tracker.uri)
    assert [r["run_id"] for r in rows] == [tracker.run_id]
    assert Path(rows[0]["artifact_uri"]).is_relative_to(other.parent.resolve() / "mlartifacts")


def test_default_store_is_in_the_results_ancestor(store):
    results, uri = store
    with tracking.Tracker(results / "runs" / "pretrain_tiny", "pretrain", {}, {}) as tracker:
        pass
    assert tracker.uri == uri == f"sqlite:///{results.resolve()}/mlflow.db"


def test_disabled_tracker_writes_nothing(tmp_path):
    out = tmp_path / "results" / "runs" / "x"
    with tracking.Tracker(out, "pretrain", {"a": 1}, {"b": 2}, enabled=False) as tracker:
        tracker.log_metrics({"loss": 1.0}, 1)
        tracker.log_artifact(tmp_path / "does-not-matter.png")
        tracker.set_tags({"c": 3})
        tracker.flush()
    tracker.close("FAILED")
    assert tracker.run_id is None and tracker.uri is None
    assert list(tmp_path.iterdir()) == []


def _downgraded_copy(store, folder: Path, stamp_only: bool) -> tuple[str, str]:
    """A copy of the shared store set back one schema revision, as an older MLflow left it
    (``stamp_only``: only the version number, all tables kept). Returns (uri, head revision)."""
    from alembic import command
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import (
        _get_alembic_config,
        _get_schema_version,
        create_sqlalchemy_engine,
    )

    shutil.copyfile(store[0] / "mlflow.db", folder / "mlflow.db")
    uri = f"sqlite:///{folder.resolve()}/mlflow.db"
    engine = create_sqlalchemy_engine(uri)
    head = _get_schema_version(engine)
    config = _get_alembic_config(uri)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        if stamp_only:
            previous = ScriptDirectory.from_config(config).get_revision(head).down_revision
            command.stamp(config, previous, purge=True)
        else:
            command.downgrade(config, "-1")
    assert _get_schema_version(engine) not in (head, None)
    engine.dispose()
    return uri, head


def test_outdated_store_is_migrated(store, tmp_path, monkeypatch):
    from mlflow.store.db.utils import _get_schema_version, create_sqlalchemy_engine

    uri, head = _downgraded_copy(store, tmp_path, stamp_only=False)
    monkeypatch.setattr(tracking, "_PREPARED", set())  # as in a new process
    assert tracking.ensure_store(tmp_path) == uri
    assert _get_schema_version(create_sqlalchemy_engine(uri)) == head


def test_store_that_needs_mlflow_db_upgrade_is_named(store, tmp_path, monkeypatch):
    uri, _ = _downgraded_copy(store, tmp_path, stamp_only=True)
    monkeypatch.setattr(tracking, "_PREPARED", set())
    with pytest.raises(tracking.TrackingError, match=f"mlflow db upgrade {uri}"):
        tracking.ensure_store(tmp_path)


def test_git_commit(tmp_path):
    assert tracking.git_commit(tmp_path) == "unknown"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    assert tracking.git_commit(tmp_path) == head.stdout.strip()

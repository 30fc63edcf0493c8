"""Fixtures for tests that run real jobs on a real single-node SLURM cluster (see cluster.py).

`slurm_cluster` starts the cluster once per session. It skips, with the exact reason, only when
this machine cannot run one (not root, binaries missing: `bash .ci/install_slurm.sh`); a daemon
that is found but crashes is an error, never a skip.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .cluster import ClusterUnavailable, SlurmCluster


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: runs real jobs on a local SLURM cluster (root)")
    config.addinivalue_line("markers", "slow: longer tests (minutes); run by make test")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A started, ready cluster with accounting; stopped (nothing left running) at session end."""
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterUnavailable as err:
        pytest.skip(str(err))
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm_environ(slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    """The cluster, with SLURM_CONF exported to this process (submitit runs sbatch/sacct with
    our environment, and jobs inherit it) for the duration of one test."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf_path))
    return slurm_cluster

"""A real single-node SLURM cluster on 127.0.0.1, with all its state in one folder.

`SlurmCluster(workdir)` starts, as root and without touching /etc or /var:

- munged with its own key and socket,
- mariadbd on a unix socket (no TCP), holding the accounting database,
- slurmdbd (accounting, so that `sacct` and submitit see cancelled jobs),
- slurmctld and slurmd for one node (the machine's real CPUs and memory) in one partition.

Every daemon runs in the foreground as a child of this process, so `stop()` ends each one by
its PID and reaps it. Ports are picked free at start-up and bound on loopback only.

Usage::

    with SlurmCluster(tmp_path / "slurm") as cluster:
        cluster.wait_ready()
        subprocess.run(["sinfo"], env=cluster.env, check=True)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

INSTALL_HINT = "bash .ci/install_slurm.sh"
REQUIRED_BINARIES = {
    "munged": "munge",
    "mungekey": "munge",
    "mariadbd": "mariadb-server",
    "mariadb-install-db": "mariadb-server",
    "mariadb": "mariadb-client",
    "slurmdbd": "slurmdbd",
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "srun": "slurm-client",
    "scontrol": "slurm-client",
    "sinfo": "slurm-client",
    "squeue": "slurm-client",
    "scancel": "slurm-client",
    "sacct": "slurm-client",
    "sacctmgr": "slurm-client",
}
# A unix socket path must fit in sockaddr_un.sun_path (108 bytes with the final NUL).
_MAX_SOCKET_PATH = 100
# AuthInfo=cred_expire also sets how long a requeued job waits before it may start again
# (default 120 s, minimum 5 s; see slurm.conf(5), AuthInfo).
CRED_EXPIRE_S = 10
# Seconds between SIGTERM and SIGKILL for a cancelled job step (slurm.conf KillWait).
KILL_WAIT_S = 5
_SWEEP_FLAG = "--sweep-when-orphaned"


class ClusterUnavailable(RuntimeError):
    """This machine cannot run the cluster (not root, a binary missing); the message says why."""


class ClusterStartError(RuntimeError):
    """A daemon died or never became ready; the message holds the tail of its logs."""


@dataclass(frozen=True)
class _Layout:
    """Every path the cluster writes, all under `root`."""

    root: Path

    @property
    def munge_dir(self) -> Path:
        return self.root / "munge"

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket"

    @property
    def munge_key(self) -> Path:
        return self.munge_dir / "munge.key"

    @property
    def mysql_dir(self) -> Path:
        return self.root / "mysql"

    @property
    def mysql_data(self) -> Path:
        return self.mysql_dir / "data"

    @property
    def mysql_socket(self) -> Path:
        return self.mysql_dir / "mysqld.sock"

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def slurm_conf(self) -> Path:
        return self.etc / "slurm.conf"

    @property
    def slurmdbd_conf(self) -> Path:
        # slurmdbd reads slurmdbd.conf from the folder of $SLURM_CONF.
        return self.etc / "slurmdbd.conf"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def log_file(self, daemon: str) -> Path:
        return self.log / f"{daemon}.log"

    def console_file(self, daemon: str) -> Path:
        """Where a daemon's own stdout/stderr go (messages printed before its log file opens)."""
        return self.log / f"{daemon}.console"

    def pid_file(self, daemon: str) -> Path:
        return self.run / f"{daemon}.pid"


@dataclass(frozen=True)
class NodeHardware:
    """What `slurmd -C` reports for this machine: the node line of slurm.conf."""

    cpus: int
    boards: int
    sockets_per_board: int
    cores_per_socket: int
    threads_per_core: int
    real_memory_mb: int

    @classmethod
    def detect(cls) -> NodeHardware:
        """Reads `slurmd -C`, the same probe slurmd uses when it registers the node."""
        out = subprocess.run(
            _resolved(["slurmd", "-C"]), capture_output=True, text=True, timeout=30, check=True
        ).stdout
        fields = dict(
            item.split("=", 1) for line in out.splitlines() for item in line.split() if "=" in item
        )
        try:
            return cls(
                cpus=int(fields["CPUs"]),
                boards=int(fields["Boards"]),
                sockets_per_board=int(fields["SocketsPerBoard"]),
                cores_per_socket=int(fields["CoresPerSocket"]),
                threads_per_core=int(fields["ThreadsPerCore"]),
                real_memory_mb=int(fields["RealMemory"]),
            )
        except (KeyError, ValueError) as err:
            raise ClusterStartError(f"cannot parse `slurmd -C` output ({err!r}):\n{out}") from err


def _search_path() -> str:
    """$PATH plus the sbin folders, where Debian puts the daemons (often not in a user's PATH)."""
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def which(name: str) -> str | None:
    """The absolute path of binary `name`, or None."""
    return shutil.which(name, path=_search_path())


def _resolved(argv: Sequence[str]) -> list[str]:
    """`argv` with its program replaced by its absolute path (found in the sbin folders too)."""
    return [which(argv[0]) or argv[0], *argv[1:]]


def missing_requirements() -> list[str]:
    """Why this machine cannot run the cluster, one reason per entry (empty when it can)."""
    reasons = []
    if sys.platform != "linux":
        reasons.append(f"the cluster needs Linux, this is {sys.platform}")
    if os.geteuid() != 0:
        reasons.append(f"the daemons must run as root, this process runs as uid {os.geteuid()}")
    missing = sorted(name for name in REQUIRED_BINARIES if which(name) is None)
    if missing:
        packages = sorted({REQUIRED_BINARIES[name] for name in missing})
        reasons.append(
            f"missing binaries {', '.join(missing)} (Debian packages {' '.join(packages)}); "
            f"install them with `{INSTALL_HINT}` as root"
        )
    return reasons


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` itself holds a TCP socket listening on `port` (any address).

    Checking the owner, not just that the port answers, keeps a stranger on a port we
    thought free from passing for our daemon."""
    listening_inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "0A":  # 0A: TCP_LISTEN
                listening_inodes.add(fields[9])
    if not listening_inodes:
        return False
    try:
        links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    except OSError:
        return False
    return any(link == f"socket:[{inode}]" for link in links for inode in listening_inodes)


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:]) if text else f"({path} is empty)"


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the test process dies without stopping us."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _processes_with_env(name: str, value: str) -> list[int]:
    """PIDs (not ours) whose initial environment has `name=value` exactly."""
    wanted = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or a kernel thread
            continue
        if wanted in environ:
            found.append(int(entry.name))
    return found


class SlurmCluster:
    """A single-node SLURM cluster with accounting, rooted in `workdir`.

    Start it with `start()` or `with SlurmCluster(workdir) as cluster:`; stop it with `stop()`
    (the context manager always stops). Run SLURM commands and submitit with `cluster.env`.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        cluster_name: str = "a2mim",
        partition: str = "debug",
        start_timeout_s: float = 120.0,
    ) -> None:
        self.layout = _Layout(Path(workdir).resolve())
        self.cluster_name = cluster_name
        self.partition = partition
        self.node_name = socket.gethostname().split(".")[0]
        self.start_timeout_s = start_timeout_s
        self.ports: dict[str, int] = {}
        self._daemons: dict[str, subprocess.Popen[bytes]] = {}
        self._sweeper: subprocess.Popen[bytes] | None = None
        self._db_password = os.urandom(12).hex()
        self._started_at: float | None = None
        self.ready_after_s: float | None = None
        """Seconds from `start()` until `wait_ready()` first saw the cluster ready."""

    # ---------------------------------------------------------------- public interface

    @property
    def conf_path(self) -> Path:
        return self.layout.slurm_conf

    @property
    def env(self) -> dict[str, str]:
        """The environment for SLURM commands and submitit: ours with SLURM_CONF set."""
        return {**os.environ, "SLURM_CONF": str(self.layout.slurm_conf)}

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> SlurmCluster:
        """Starts munged, mariadbd, slurmdbd, slurmctld and slurmd; stops them all on failure.

        Raises ClusterUnavailable when this machine cannot run them at all, and
        ClusterStartError (with log tails) when one dies or does not come up.
        """
        reasons = missing_requirements()
        if reasons:
            raise ClusterUnavailable("cannot start a SLURM cluster: " + "; ".join(reasons))
        if self._daemons or self._sweeper is not None:
            raise RuntimeError(f"the cluster in {self.layout.root} is already started")
        self._started_at = time.monotonic()
        try:
            self._prepare_dirs()
            self._start_sweeper()
            self._start_munge()
            self._start_mariadb()
            self._write_slurm_conf(NodeHardware.detect())
            self._start_slurmdbd()
            self._register_cluster()
            self._start_slurmctld()
            self._start_slurmd()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Waits until slurmctld answers, the node is idle and `sacct` answers."""
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            ping = self.run(["scontrol", "ping"], check=False)
            state = self.run(["sinfo", "-h", "-n", self.node_name, "-o", "%T"], check=False)
            sacct = self.run(["sacct", "-n", "-X", "-o", "JobID"], check=False)
            node_state = state.stdout.strip()
            last = (
                f"`scontrol ping`: {ping.stdout.strip() or ping.stderr.strip()}; "
                f"node state: {node_state or state.stderr.strip()!r}; "
                f"`sacct` rc={sacct.returncode} {sacct.stderr.strip()}"
            )
            if "UP" in ping.stdout and node_state == "idle" and sacct.returncode == 0:
                if self.ready_after_s is None and self._started_at is not None:
                    self.ready_after_s = time.monotonic() - self._started_at
                return
            time.sleep(0.5)
        reason = self.run(["sinfo", "-R"], check=False).stdout
        raise ClusterStartError(
            f"cluster not ready after {timeout_s:.0f} s: {last}\n`sinfo -R`:\n{reason}\n"
            + self._log_tails(["slurmctld", "slurmd"])
        )

    def run(
        self, args: Sequence[str], *, check: bool = True, timeout_s: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Runs one SLURM command against this cluster; with `check`, failure raises with stderr."""
        proc = subprocess.run(
            _resolved(args), env=self.env, capture_output=True, text=True, timeout=timeout_s
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(args)}` failed (rc={proc.returncode}): {proc.stderr.strip()}"
            )
        return proc

    def stop(self, timeout_s: float = 15.0) -> None:
        """Cancels jobs, ends every daemon by its PID (SIGTERM, SIGKILL after `timeout_s`),
        reaps them, then kills any job process left behind. Calling it again does nothing."""
        if not self._daemons and self._sweeper is None:
            return
        if self._alive("slurmctld"):
            self._cancel_all_jobs(timeout_s)
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            proc = self._daemons.pop(name, None)
            if proc is not None:
                _terminate(proc, timeout_s)
        self._daemons.clear()
        # slurmstepd and job processes are not our children; they carry our SLURM_CONF.
        _end_strangers(_processes_with_env("SLURM_CONF", str(self.layout.slurm_conf)), timeout_s)
        if self._sweeper is not None:
            _terminate(self._sweeper, timeout_s)
            self._sweeper = None

    # ---------------------------------------------------------------- start-up steps

    def _prepare_dirs(self) -> None:
        layout = self.layout
        for path in (layout.munge_socket, layout.mysql_socket):
            if len(str(path)) > _MAX_SOCKET_PATH:
                raise ValueError(
                    f"socket path {path} is longer than {_MAX_SOCKET_PATH} characters; "
                    "use a shorter workdir (e.g. pytest --basetemp=/tmp/pt)"
                )
        layout.root.mkdir(parents=True, exist_ok=True)
        for path in (
            layout.munge_dir,
            layout.mysql_dir,
            layout.etc,
            layout.state,
            layout.spool,
            layout.run,
            layout.log,
            layout.tmp,
        ):
            path.mkdir(mode=0o700, exist_ok=True)
        # munged refuses group/world-writable folders on the way to its key and socket.
        layout.root.chmod(0o700)

    def _start_sweeper(self) -> None:
        """A watchdog that ends the jobs if this process dies without `stop()` (SIGKILL).

        The daemons get SIGTERM from the kernel then (PR_SET_PDEATHSIG), but slurmstepd and
        job processes are not our children; the watchdog finds them by our SLURM_CONF."""
        env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
        self._sweeper = subprocess.Popen(
            [sys.executable, __file__, _SWEEP_FLAG, str(self.layout.slurm_conf), str(os.getpid())],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _start_munge(self) -> None:
        layout = self.layout
        keygen = subprocess.run(
            _resolved(["mungekey", "--create", "--force", f"--keyfile={layout.munge_key}"]),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if keygen.returncode != 0:
            raise ClusterStartError(
                f"mungekey could not create {layout.munge_key}: {keygen.stderr.strip()}"
            )
        layout.munge_key.chmod(0o600)
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={layout.munge_socket}",
                f"--key-file={layout.munge_key}",
                f"--pid-file={layout.pid_file('munged')}",
                f"--log-file={layout.log_file('munged')}",
                f"--seed-file={layout.munge_dir / 'munged.seed'}",
            ],
        )
        self._wait_for("munged", layout.munge_socket.exists, "its socket")

    def _mariadb_options(self) -> list[str]:
        return [
            f"--datadir={self.layout.mysql_data}",
            "--user=root",
            f"--tmpdir={self.layout.tmp}",
            # Small on purpose: slurmdbd logs "Database settings not recommended values"
            # for these two, which is harmless for a handful of test jobs.
            "--innodb-buffer-pool-size=128M",
            "--innodb-log-file-size=8M",
            "--innodb-lock-wait-timeout=900",
        ]

    def _start_mariadb(self) -> None:
        layout = self.layout
        install = subprocess.run(
            _resolved(
                [
                    "mariadb-install-db",
                    "--no-defaults",
                    *self._mariadb_options(),
                    "--auth-root-authentication-method=socket",
                    "--skip-test-db",
                ]
            ),
            capture_output=True,
            text=True,
            timeout=180,
        )
        if install.returncode != 0:
            raise ClusterStartError(
                f"mariadb-install-db into {layout.mysql_data} failed (rc={install.returncode}):\n"
                f"{install.stdout[-3000:]}\n{install.stderr[-3000:]}"
            )
        self._spawn(
            "mariadbd",
            [
                "mariadbd",
                "--no-defaults",
                *self._mariadb_options(),
                f"--socket={layout.mysql_socket}",
                f"--pid-file={layout.pid_file('mariadbd')}",
                f"--log-error={layout.log_file('mariadbd')}",
                "--skip-networking",
                "--skip-log-bin",
            ],
        )
        self._wait_for("mariadbd", lambda: self._sql("SELECT 1", check=False) == 0, "SQL")
        self._sql(
            "CREATE DATABASE slurm_acct_db; "
            f"CREATE USER 'slurm'@'localhost' IDENTIFIED BY '{self._db_password}'; "
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
        )

    def _sql(self, statement: str, *, check: bool = True) -> int:
        proc = subprocess.run(
            _resolved(
                [
                    "mariadb",
                    "--no-defaults",
                    f"--socket={self.layout.mysql_socket}",
                    "--user=root",
                    "-e",
                    statement,
                ]
            ),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check and proc.returncode != 0:
            raise ClusterStartError(
                f"SQL on {self.layout.mysql_socket} failed: {proc.stderr.strip()}\n"
                + self._log_tails(["mariadbd"])
            )
        return proc.returncode

    def _write_slurm_conf(self, hw: NodeHardware) -> None:
        layout = self.layout
        for name in ("slurmdbd", "slurmctld", "slurmd"):
            self.ports[name] = free_port()
        munge_socket = layout.munge_socket
        # Without a memory request a job would get the whole node and jobs would run one by one.
        def_mem_per_cpu = max(1, min(1024, hw.real_memory_mb // (2 * hw.cpus)))
        slurm_conf = f"""\
# Generated by tests/slurm/cluster.py; all state lives under {layout.root}.
ClusterName={self.cluster_name}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={self.ports["slurmctld"]}
SlurmdPort={self.ports["slurmd"]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_S}
CredType=cred/munge
StateSaveLocation={layout.state}
SlurmdSpoolDir={layout.spool}
SlurmctldPidFile={layout.pid_file("slurmctld")}
SlurmdPidFile={layout.pid_file("slurmd")}
SlurmctldLogFile={layout.log_file("slurmctld")}
SlurmdLogFile={layout.log_file("slurmd")}
SlurmctldDebug=info
SlurmdDebug=info
TmpFS={layout.tmp}
PlugStackConfig={layout.etc / "plugstack.conf"}
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
LaunchType=launch/slurm
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU={def_mem_per_cpu}
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={self.ports["slurmdbd"]}
AccountingStoragePass={munge_socket}
JobCompType=jobcomp/none
MinJobAge=10
KillWait={KILL_WAIT_S}
ReturnToService=2
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
NodeName={self.node_name} NodeHostname={self.node_name} NodeAddr=127.0.0.1 \
CPUs={hw.cpus} Boards={hw.boards} SocketsPerBoard={hw.sockets_per_board} \
CoresPerSocket={hw.cores_per_socket} ThreadsPerCore={hw.threads_per_core} \
RealMemory={hw.real_memory_mb} State=UNKNOWN
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        slurmdbd_conf = f"""\
# Generated by tests/slurm/cluster.py.
AuthType=auth/munge
AuthInfo=socket={munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={self.ports["slurmdbd"]}
SlurmUser=root
PidFile={layout.pid_file("slurmdbd")}
LogFile={layout.log_file("slurmdbd")}
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass={self._db_password}
StorageLoc=slurm_acct_db
"""
        _write_atomic(layout.etc / "plugstack.conf", "")
        _write_atomic(layout.slurm_conf, slurm_conf)
        # slurmdbd refuses a slurmdbd.conf that others may read (it holds the DB password).
        _write_atomic(layout.slurmdbd_conf, slurmdbd_conf, mode=0o600)

    def _start_slurmdbd(self) -> None:
        # The MySQL client library takes its default socket from MYSQL_UNIX_PORT.
        self._spawn(
            "slurmdbd",
            ["slurmdbd", "-D"],
            extra_env={"MYSQL_UNIX_PORT": str(self.layout.mysql_socket)},
        )
        self._wait_for_listen("slurmdbd")

    def _register_cluster(self) -> None:
        add = self.run(
            ["sacctmgr", "-i", "add", "cluster", self.cluster_name], check=False, timeout_s=60
        )
        listed = self.run(
            ["sacctmgr", "-n", "-P", "list", "cluster", "format=Cluster"], check=False
        )
        if self.cluster_name not in listed.stdout.split():
            self._check_alive()
            raise ClusterStartError(
                f"sacctmgr did not register cluster {self.cluster_name!r}: "
                f"{add.stderr.strip()} {listed.stderr.strip()}\n" + self._log_tails(["slurmdbd"])
            )

    def _start_slurmctld(self) -> None:
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait_for_listen("slurmctld")
        self._wait_for(
            "slurmctld",
            lambda: "UP" in self.run(["scontrol", "ping"], check=False).stdout,
            "`scontrol ping`",
        )

    def _start_slurmd(self) -> None:
        self._spawn("slurmd", ["slurmd", "-D", "-N", self.node_name])
        self._wait_for_listen("slurmd")

    # ---------------------------------------------------------------- process handling

    def _spawn(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> None:
        console = self.layout.console_file(name).open("ab")
        try:
            self._daemons[name] = subprocess.Popen(
                _resolved(argv),
                env={**self.env, **(extra_env or {})},
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                cwd=self.layout.run,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            console.close()

    def _alive(self, name: str) -> bool:
        proc = self._daemons.get(name)
        return proc is not None and proc.poll() is None

    def _check_alive(self) -> None:
        for name, proc in self._daemons.items():
            if proc.poll() is not None:
                raise ClusterStartError(
                    f"{name} (pid {proc.pid}) exited with code {proc.returncode}\n"
                    + self._log_tails([name])
                )

    def _wait_for(self, name: str, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            if ready():
                return
            time.sleep(0.2)
        raise ClusterStartError(
            f"{name} did not answer on {what} within {self.start_timeout_s:.0f} s\n"
            + self._log_tails([name])
        )

    def _wait_for_listen(self, name: str) -> None:
        pid, port = self._daemons[name].pid, self.ports[name]
        self._wait_for(name, lambda: _listens_on(pid, port), f"port {port}")

    def _log_tails(self, names: Sequence[str]) -> str:
        parts = []
        for name in names:
            # The console holds what a daemon printed before its log file opened.
            for path, lines in (
                (self.layout.log_file(name), 40),
                (self.layout.console_file(name), 15),
            ):
                if path.exists() and path.stat().st_size:
                    parts.append(f"--- tail of {path} ---\n{_tail(path, lines)}")
        return "\n".join(parts) or f"(no log output from {', '.join(names)})"

    def _cancel_all_jobs(self, timeout_s: float) -> None:
        try:
            self.run(["scancel", "--quiet", "--partition", self.partition], check=False)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                queue = self.run(["squeue", "-h", "-o", "%i"], check=False)
                if queue.returncode != 0 or not queue.stdout.strip():
                    return
                time.sleep(0.5)
        except subprocess.TimeoutExpired:
            pass


def _terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`; always reaps."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def _end_strangers(pids: list[int], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`, for processes that are not our children."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
            time.sleep(0.1)
        if not pids:
            return


def _sweep_when_orphaned(conf: str, parent: int) -> None:
    """Watchdog body: once `parent` is gone, end every process started for cluster `conf`."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a normal stop() ends us
    while os.getppid() == parent:
        time.sleep(1.0)
    _end_strangers(_processes_with_env("SLURM_CONF", conf), KILL_WAIT_S)


if __name__ == "__main__" and sys.argv[1:2] == [_SWEEP_FLAG]:
    _sweep_when_orphaned(sys.argv[2], int(sys.argv[3]))

"""Atomic file writes: write beside the target, then rename over it.

A reader (or a restarted job) sees either the old file or the complete new one, never a partial
write; a failure removes the temp file and leaves the target untouched.

A writer killed mid-write (SIGKILL, OOM, node loss) cannot remove its temp file, so every temp
file's name carries its writer (``.<stem>.a2mim-<host>-<pid>-<random><suffix>.tmp``) and each
new write of the same target removes the temp files of writers that are gone: those of this host
whose process no longer exists, and those of other hosts older than :data:`STALE_AFTER_S`. No
other file is ever touched.

A full disk (or quota) is reported as :class:`DiskFullError`: "no space left on device", the
file, the folder and the free space, whatever layer (``torch.save``'s zip writer wraps it in a
RuntimeError) noticed it first.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STALE_AFTER_S = 24 * 3600  # a temp file of another host this old has no live writer
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname().split(".")[0]) or "host"
_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A write failed because the filesystem (or the user's quota) is full."""


def _temp_prefix(path: Path) -> str:
    return f".{path.stem}.a2mim-"


def _writer_of(name: str, prefix: str) -> tuple[str, int] | None:
    """``(host, pid)`` of one of our temp file names, or None for any other name."""
    match = re.match(re.escape(prefix) + r"(.+)-(\d+)-", name)
    return (match.group(1), int(match.group(2))) if match else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temp files of ``path`` left by writers that are gone; returns them."""
    path = Path(path)
    prefix, removed = _temp_prefix(path), []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f"{glob_escape(prefix)}*{glob_escape(path.suffix)}.tmp"):
        writer = _writer_of(tmp.name, prefix)
        if writer is None:
            continue
        host, pid = writer
        try:
            age = time.time() - tmp.stat().st_mtime
        except FileNotFoundError:
            continue
        stale = (not _alive(pid)) if host == _HOST else age > STALE_AFTER_S
        if stale:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _disk_full(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _free_bytes(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown"
    return f"{free / 2**20:.1f} MiB"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path in ``path``'s folder; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f"{_temp_prefix(path)}{_HOST}-{os.getpid()}-",
        suffix=path.suffix + ".tmp",
        dir=path.parent,
    )
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except Exception as exc:
        if _disk_full(exc):
            Path(tmp).unlink(missing_ok=True)
            raise DiskFullError(
                errno.ENOSPC,
                f"no space left on device while writing {path} (filesystem of {path.parent}, "
                f"{_free_bytes(path.parent)} free after removing the partial file): free space "
                "there or write the run to a larger filesystem (--out); the previous file, if "
                "any, is intact",
            ) from exc
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)

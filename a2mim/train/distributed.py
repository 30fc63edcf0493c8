"""Where this process runs: joining the process group, its rank, and its device.

A stage runs as one process per GPU (or several CPU processes with gloo). The launcher, torchrun
or Submitit's ``TorchDistributedEnvironment().export()``, describes the group with the env://
variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` joins it when ``WORLD_SIZE > 1`` and does nothing otherwise, so the
same command runs alone or under either launcher. :func:`process_group` wraps a stage in
join-and-leave.

What a stage must keep in mind under ``world_size > 1`` (all stages follow it):

- rank ``r`` takes every ``world_size``-th sample of the epoch's permutation (``EpochSampler``,
  ``AugSampler``), so row ``j`` of rank ``r``'s micro-batch is row ``j * world_size + r`` of the
  global micro-batch (:func:`local_rows`); anything drawn per sample (pre-training masks) is
  drawn for the global micro-batch and sliced, so it does not depend on the number of processes;
- randomness that is per process by nature (drop path, dropout, Mixup pairing) uses
  :func:`rank_seed`, so ranks draw independent streams;
- DDP averages gradients, so per-rank losses that are means over equally sized shards give the
  gradient of the global mean; logged losses are averaged over ranks (:func:`mean_over_ranks`);
- rank 0 alone writes files and logs to MLflow; evaluation shards the validation set and sums
  the counts over ranks, after :func:`broadcast_buffers` gave every rank rank 0's BatchNorm
  statistics (the ones rank 0 saves), so the metrics are those of the saved model on the whole
  set.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from a2mim.train.sampling import mix_seed

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

__all__ = [
    "ENV_VARS",
    "DistributedEnvError",
    "broadcast_buffers",
    "init_distributed",
    "local_rows",
    "mean_over_ranks",
    "process_group",
    "rank_seed",
    "resolve_device",
    "teardown",
    "world_info",
]


class DistributedEnvError(ValueError):
    """The env:// variables describe no usable process group; the message says which."""


def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise DistributedEnvError(f"${name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedEnvError(f"${name} must be an integer, got {raw!r}") from None


def _uses_cuda(device: str) -> bool:
    """Whether a stage with ``device`` (``auto``, ``cpu``, ``cuda``) runs on the GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise DistributedEnvError(
            "device 'cuda' was asked for but torch sees no CUDA device; use device=auto or cpu"
        )
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Join the env:// process group when ``$WORLD_SIZE > 1``; returns ``(rank, world_size)``.

    Backend: NCCL when the stage runs on CUDA (``device`` is ``cuda``, or ``auto`` with a GPU),
    after ``torch.cuda.set_device(LOCAL_RANK)``; gloo on the CPU. A second call (or a group
    someone else initialised) is a no-op. Missing or inconsistent variables are a
    :class:`DistributedEnvError` that names them.
    """
    if not dist.is_available():
        if _env_int("WORLD_SIZE", 1) > 1:
            raise DistributedEnvError(
                "WORLD_SIZE > 1 but this torch build has no torch.distributed"
            )
        return 0, 1
    if dist.is_initialized():
        return world_info()
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return 0, 1
    missing = [name for name in ENV_VARS if not os.environ.get(name)]
    if missing:
        raise DistributedEnvError(
            f"WORLD_SIZE={world} but {', '.join('$' + m for m in missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: launch with torchrun, or call "
            f"submitit.helpers.TorchDistributedEnvironment().export() in the job, or unset "
            f"WORLD_SIZE to run a single process"
        )
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if not 0 <= rank < world:
        raise DistributedEnvError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    if _uses_cuda(device):
        if local_rank >= torch.cuda.device_count():
            raise DistributedEnvError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA "
                f"device(s): start at most one process per GPU"
            )
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    store = _rendezvous_store(rank, world)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    return rank, world


STORE_TIMEOUT = datetime.timedelta(minutes=30)  # torch's default for init_process_group


def _rendezvous_store(rank: int, world: int) -> dist.TCPStore:
    """The env:// rendezvous store, but rank 0's server listens on ``MASTER_ADDR`` only, not on
    every interface of the node (torch's TCPStore binds ``::``). When ``MASTER_ADDR`` resolves
    to a loopback address while ranks run on other nodes (a hostname that /etc/hosts maps to
    127.0.1.1), binding there would lock them out: then it listens on all interfaces, as torch
    does. Under torchrun, whose agent serves the store, every rank is a client."""
    addr, port = os.environ["MASTER_ADDR"], _env_int("MASTER_PORT")
    # Under torchrun the agent already serves the store (its own business); ranks are clients.
    serve = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
    listen_fd = None
    if serve:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[
            0
        ]
        local_world = _env_int("LOCAL_WORLD_SIZE", world)
        if not (ipaddress.ip_address(sockaddr[0]).is_loopback and local_world < world):
            server = socket.socket(family, kind, proto)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                server.bind(sockaddr)
                server.listen(max(world, 128))
            except OSError:
                server.close()
                raise
            listen_fd = server.detach()  # the store owns and closes it
    return dist.TCPStore(
        addr, port, world, serve, timeout=STORE_TIMEOUT, master_listen_fd=listen_fd
    )


def teardown(barrier: bool = True) -> None:
    """Leave the process group (no-op without one). ``barrier`` first waits for every rank, so
    no process exits while rank 0 is still writing the run's final files; pass False after an
    error, when the other ranks may never arrive."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


@contextmanager
def process_group(device: str = "auto") -> Iterator[tuple[int, int]]:
    """``init_distributed(device)`` for the block, then :func:`teardown` (with the final
    barrier only when the block succeeded)."""
    info = init_distributed(device)
    try:
        yield info
    except BaseException:
        teardown(barrier=False)
        raise
    teardown()


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` under a process group with more
    than one rank -> ``cuda:LOCAL_RANK`` (one GPU per process, as :func:`init_distributed` set
    it); other names as given."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world_info()[1] > 1:
        return torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return torch.device(name)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own stream for draws that are per process by nature (drop
    path, dropout, Mixup): rank 0 keeps ``seed`` (a single-process run is unchanged), other
    ranks get independent streams instead of repeating rank 0's draws."""
    return seed if rank == 0 else mix_seed(seed, rank)


def local_rows(global_batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows ``rank::world`` of a tensor drawn for the global micro-batch: the
    samplers give rank ``r`` every ``world``-th element of the epoch's order, so global row
    ``j * world + r`` is row ``j`` of rank ``r``."""
    return global_batch[rank::world]


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` averaged over ranks (unchanged without a process group); every rank gets the
    same result, so decisions taken from it (a non-finite loss) agree."""
    _, world = world_info()
    if world == 1:
        return values
    out = values.detach().clone()
    dist.all_reduce(out)
    return out / world


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank. Under DDP each rank
    updates them from its own shard after DDP's per-forward broadcast, so before an evaluation
    over sharded data every rank must use the statistics rank 0 saves."""
    _, world = world_info()
    if world == 1:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)

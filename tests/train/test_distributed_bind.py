"""torch.distributed's rendezvous server listens on MASTER_ADDR only, not on every interface."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.slurm.cluster import free_port

SCRIPT = """
import sys
from pathlib import Path
import torch.distributed as dist
from a2mim.train.distributed import init_distributed, teardown

rank, world = init_distributed("cpu")
port = int(sys.argv[1])
if rank == 0:
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    rows += Path("/proc/net/tcp6").read_text().splitlines()[1:]
    listening = [r.split()[1] for r in rows if r.split()[3] == "0A"]
    print("LISTEN", " ".join(a for a in listening if a.endswith(f":{port:04X}")))
dist.all_reduce(t := __import__("torch").ones(1))
print("SUM", int(t.item()))
teardown()
"""


def test_rendezvous_listens_on_the_master_address_only():
    port = free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        }  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", SCRIPT, str(port)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    listen = next(line for line in outs[0][0].splitlines() if line.startswith("LISTEN"))
    # 0100007F = 127.0.0.1 in /proc's byte order; never 00000000 (all IPv4) or :: (all IPv6)
    assert listen.split()[1:] == [f"0100007F:{port:04X}"], listen
    assert all("SUM 2" in out for out, _ in outs)

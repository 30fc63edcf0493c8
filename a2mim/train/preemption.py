"""Save-on-signal: the cluster's stop request, seen by the training loop at a step boundary.

SLURM warns a job before its time limit or a preemption (Submitit asks for ``--signal=USR2@90``).
The launcher's signal handler only calls :func:`request`; the training engine checks
:func:`requested` after every optimizer step, writes the checkpoint of that step and raises
:class:`Preempted`; the launcher then requeues the job, which resumes from that checkpoint. So at
most the step in flight is lost, and the weights are never read while an update is half applied.
"""

from __future__ import annotations

_reason: str | None = None


class Preempted(Exception):
    """Raised by the engine after it saved the checkpoint of the current step on request."""


def request(reason: str = "signal") -> None:
    """Ask the running stage to save at its next step boundary and stop (signal-handler safe)."""
    global _reason
    _reason = reason


def requested() -> str | None:
    """The pending request's reason, or None."""
    return _reason


def reset() -> None:
    """Forget a request (a new attempt, or a test)."""
    global _reason
    _reason = None


__all__ = ["Preempted", "request", "requested", "reset"]

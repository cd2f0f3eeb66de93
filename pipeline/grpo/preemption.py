"""SLURM preemption for the Fabric loop (Fabric registers no handler, unlike Lightning's Trainer).

The handler only sets a flag: checkpointing inside a signal handler can hang (Lightning #21406).
The loop checks the flag at a step boundary (all-reduced so every rank agrees), saves, asks SLURM
to requeue the job on rank 0, and exits; the requeued job resumes from that checkpoint.

Containers often lack ``scontrol``. Like Lightning, the requeue is retried through a shell; if that
fails too, the process exits with ``REQUEUE_EXIT`` (128 + SIGUSR1, what srun reports for a step
killed by that signal), and the sbatch template, which runs on the host, requeues the job itself.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess

log = logging.getLogger(__name__)
REQUEUE_EXIT = 128 + signal.SIGUSR1


class PreemptionFlag:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.received: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        self.received = signum

    def __bool__(self) -> bool:
        return self.received is not None


def slurm_job_id() -> str | None:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return job


def requeue_slurm_job() -> int:
    """Ask SLURM to requeue this job; the exit code the process should end with."""
    job = slurm_job_id()
    if not job:
        log.info("not a SLURM job: nothing to requeue; continue the run with --resume")
        return 0
    if not re.fullmatch(r"[0-9_]+", job):
        log.warning("SLURM job id %r is not a job id: not requeueing; exiting with %d", job, REQUEUE_EXIT)
        return REQUEUE_EXIT
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:  # not on this PATH: a shell may find it (Lightning retries the same way)
        result = subprocess.run(f"scontrol requeue {job}", shell=True, capture_output=True, text=True)
    if result.returncode == 0:
        log.info("requeued SLURM job %s", job)
        return 0
    log.warning("could not requeue SLURM job %s here (scontrol exit %d: %s); exiting with %d so the sbatch "
                "template requeues it", job, result.returncode, result.stderr.strip() or "no output", REQUEUE_EXIT)
    return REQUEUE_EXIT

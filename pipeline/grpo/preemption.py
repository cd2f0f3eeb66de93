"""SLURM preemption for the Fabric loop (Fabric registers no handler, unlike Lightning's Trainer).

The handler only sets a flag: checkpointing inside a signal handler can hang (Lightning #21406).
The loop checks the flag at a step boundary (all-reduced so every rank agrees), saves, asks SLURM
to requeue the job on rank 0, and exits; the requeued job resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

log = logging.getLogger(__name__)


class PreemptionFlag:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.received: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        self.received = signum

    def __bool__(self) -> bool:
        return self.received is not None


def requeue_slurm_job() -> None:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    if os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    log.info("scontrol requeue %s -> exit %d %s", job, result.returncode, result.stderr.strip())

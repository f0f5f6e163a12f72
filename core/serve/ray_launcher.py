"""Runs as Ray Jobs, for a lab that outgrows one machine. Every node mounts the same data
directory (FINETUNE_LAB_HOME) at the same path and has this app with the same Python environment
at the same path; each job is the one-run entry point `python -m core job RUN_ID`, asking Ray for
the CPUs (or one GPU) a run needs. The app's own queue (core.serve.runqueue) still decides the order and
the caps: a run is submitted only when the cluster has a free slot, since a Ray job that waits too
long for resources fails on its own.

`ray` is an optional install (requirements-cluster.txt); nothing imports this module otherwise.
"""
from __future__ import annotations

import os
import shlex
import sys

from core import paths
from core.serve import slots
from core.serve.runqueue import Job
from core.serve.store import Run

ENDED = {"SUCCEEDED": 0, "STOPPED": -15, "FAILED": 1}
CAPACITY_TTL_S = 10.0


def job_env(threads: int) -> dict:
    """What the job's process needs of ours: the data directory and the lab's switches."""
    env = {k: v for k, v in os.environ.items() if k.startswith(("FINETUNE_LAB_", "HF_HUB_"))}
    env.update(slots.thread_env(threads), FINETUNE_LAB_HOME=str(paths.home()), FINETUNE_LAB_NICE="10",
               PYTHONUNBUFFERED="1")
    env.pop("FINETUNE_LAB_RAY_ADDRESS", None)
    return env


class RayLauncher:
    name = "ray"

    def __init__(self, address: str, cpus_per_run: int | None = None, runs_per_gpu: int = 1):
        from ray.job_submission import JobSubmissionClient
        self.address = address.rstrip("/")
        self.client = JobSubmissionClient(self.address)
        self.cpus = cpus_per_run or int(os.environ.get("FINETUNE_LAB_RAY_CPUS", "1") or 1)
        self.per_gpu = max(1, runs_per_gpu)
        self.slots = slots.Cached(self._measure, CAPACITY_TTL_S)

    # ------------------------------------------------------------ room
    def _measure(self) -> list[slots.Slot]:
        """One slot per GPU in the cluster (k per GPU), else one per `cpus` CPUs."""
        from ray.util.state import list_nodes
        try:
            nodes = [n for n in list_nodes(address=self.address, timeout=10) if n.state == "ALIVE"]
        except Exception:  # noqa: BLE001 - an unreachable head means no room, not a dead server
            return []
        gpus = int(sum(n.resources_total.get("GPU", 0) for n in nodes))
        cpus = int(sum(n.resources_total.get("CPU", 0) for n in nodes))
        if gpus:
            return [slots.Slot(i + 1, "ray-gpu", self.cpus) for i in range(gpus * self.per_gpu)]
        return [slots.Slot(i + 1, "ray-cpu", self.cpus) for i in range(cpus // self.cpus)]

    # ------------------------------------------------------------ jobs
    def start(self, job: Job, slot: slots.Slot, run: Run) -> Job:
        from core.serve.executor import job_args
        args = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "core", "job", job.run_id, *job_args(job)])
        gpus = 1 / self.per_gpu if slot.device == "ray-gpu" else 0
        job.handle = self.client.submit_job(
            entrypoint=f"cd {shlex.quote(str(paths.REPO_ROOT))} && {args}",
            submission_id=f"finetune-lab-{job.run_id}-{job.seq}",
            entrypoint_num_cpus=self.cpus, entrypoint_num_gpus=gpus,
            runtime_env={"env_vars": job_env(self.cpus)},
            metadata={"run": job.run_id, "owner": job.owner or "-"})
        return job

    def started(self, job: Job) -> bool:
        return bool(job.handle)

    def mine(self, job: Job) -> bool:
        return True        # any server can ask Ray how a job is doing

    def collect(self) -> None:
        pass

    def poll(self, job: Job) -> tuple[bool, int | None]:
        try:
            state = str(self.client.get_job_status(job.handle).value)
        except Exception:  # noqa: BLE001 - head unreachable for a moment: ask again next tick
            return False, None
        if state not in ENDED:
            return False, None
        self._keep_logs(job)
        return True, ENDED[state]

    def kill(self, job: Job) -> None:
        try:
            self.client.stop_job(job.handle)
        except Exception:  # noqa: BLE001
            pass

    def _keep_logs(self, job: Job) -> None:
        """Ray's log of the job ends up in the run folder, beside the local runs' train.log."""
        try:
            text = self.client.get_job_logs(job.handle)
            with open(Run(paths.runs_dir() / job.run_id).file("train.log"), "a", encoding="utf-8") as f:
                f.write(text)
        except Exception:  # noqa: BLE001 - logs are a convenience; the run folder has the truth
            pass

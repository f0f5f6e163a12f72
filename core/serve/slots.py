"""How many runs train at once on this machine, and on what: one slot per CUDA device (or k per
device for small runs), one on Apple MPS, and on a CPU-only machine a split of the cores
(1 slot up to 4 cores; from 8 cores, slots of about 8 threads). The server's operator fixes it
with FINETUNE_LAB_SLOTS / FINETUNE_LAB_RUNS_PER_GPU; otherwise the teacher's setting on Home
applies (0 = automatic)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

ENV_SLOTS = "FINETUNE_LAB_SLOTS"
ENV_PER_GPU = "FINETUNE_LAB_RUNS_PER_GPU"


@dataclass(frozen=True)
class Slot:
    index: int          # 1-based, as pages show it
    device: str         # "cuda:2", "mps", "cpu"
    threads: int
    env: dict = field(default_factory=dict, compare=False, hash=False)

    def label(self) -> str:
        return f"slot {self.index} · {self.device} · {self.threads} thread(s)"


class Cached:
    """`plan()` re-read at most every `ttl` seconds: the slots a dispatcher asks for on every tick
    change only when the teacher (or the cluster) changes them."""

    def __init__(self, plan, ttl: float):
        self.plan, self.ttl, self._when, self._known = plan, ttl, 0.0, []

    def __call__(self) -> list:
        import time
        if time.monotonic() - self._when > self.ttl or not self._known:
            self._when, self._known = time.monotonic(), self.plan()
        return self._known


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:          # macOS, Windows
        return os.cpu_count() or 1


def gpu_count() -> int:
    """CUDA devices this process may use (honours CUDA_VISIBLE_DEVICES); no CUDA context made."""
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - a broken driver means "no GPU", not a dead server
        return 0


def has_mps() -> bool:
    try:
        import torch
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    except Exception:  # noqa: BLE001
        return False


def _int_env(name: str) -> int:
    try:
        return max(0, int(os.environ.get(name, "0")))
    except ValueError:
        return 0


def auto_cpu_slots(n_cores: int) -> int:
    return 1 if n_cores <= 4 else max(2, n_cores // 8)


def fixed_by_env() -> bool:
    return bool(_int_env(ENV_SLOTS) or _int_env(ENV_PER_GPU))


def plan(setting: int = 0, per_gpu: int = 1, n_cores: int | None = None,
         n_gpus: int | None = None, mps: bool | None = None) -> list[Slot]:
    """The machine's slots. `setting` (the teacher's number of CPU slots, 0 = automatic) and
    `per_gpu` (runs per GPU) are overridden by the environment variables when set."""
    n_cores = cores() if n_cores is None else n_cores
    n_gpus = gpu_count() if n_gpus is None else n_gpus
    setting = _int_env(ENV_SLOTS) or setting
    per_gpu = max(1, _int_env(ENV_PER_GPU) or per_gpu)
    if n_gpus:
        count = setting or n_gpus * per_gpu
        threads = max(1, n_cores // count)
        return [Slot(i + 1, f"cuda:{i % n_gpus}", threads,
                     {"CUDA_VISIBLE_DEVICES": _visible(i % n_gpus)}) for i in range(count)]
    if has_mps() if mps is None else mps:
        return [Slot(1, "mps", n_cores)]
    count = setting or auto_cpu_slots(n_cores)
    threads = max(1, n_cores // count)
    return [Slot(i + 1, "cpu", threads, {"CUDA_VISIBLE_DEVICES": ""}) for i in range(count)]


def _visible(index: int) -> str:
    """The physical id of this process's index-th visible GPU (CUDA_VISIBLE_DEVICES may already
    narrow the server to some of them)."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[index] if index < len(visible) else str(index)


def thread_env(threads: int) -> dict:
    """Every native thread pool of the child sized to its slot (set before torch is imported)."""
    value = str(threads)
    return {"FINETUNE_LAB_THREADS": value, "OMP_NUM_THREADS": value, "MKL_NUM_THREADS": value,
            "OPENBLAS_NUM_THREADS": value}

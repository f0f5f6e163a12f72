"""Estimate before you allocate: what a run (or a cache) will need in memory and on disk, checked
against what the machine has free, so a setting that can't fit is refused with one sentence
before anything is allocated, instead of ending in the OOM killer or a SIGBUS.

Activation memory is measured once per backbone (the outputs of its layers for one small image,
scaled by the image area) and kept in the data directory, like the precision trial.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from core import paths

MARGIN = 0.85            # use at most this share of what is free
GRAD_FACTOR = 1.0        # measured: MobileNetV2 full fine-tune at 384 px kept 230 MB per image; layer outputs sum to 279
PROBE_SIZE = 64
DECODED_ASPECT = 1.4     # decoded images keep their aspect: the long side is often 4/3 of the short
TRAINED_SHARE = {"head": 0.0, "top_k": 0.5, "full": 1.0, "scratch": 1.0}   # of the network that backpropagates


class ResourceError(ValueError):
    """A job that would not fit the machine; the message says what to change."""


def gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def free_memory() -> int:
    """Bytes the system could give us now (MemAvailable), or a large number where unknown."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 50
    return min(available, _cgroup_room())


def _cgroup_room() -> int:
    """This process's container or cgroup memory limit minus what it uses (cgroup v2 or v1, the
    process's own group from /proc/self/cgroup), else no limit."""
    for limit_file, used_file in _cgroup_files():
        try:
            limit = limit_file.read_text().strip()
            used = int(used_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit != "max" and int(limit) < 1 << 60:
            return int(limit) - used
    return 1 << 50


def _cgroup_files() -> list[tuple[Path, Path]]:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        _, controllers, group = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            base = Path("/sys/fs/cgroup") / group.lstrip("/")
            out.append((base / "memory.max", base / "memory.current"))
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / group.lstrip("/")
            out.append((base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"))
    return out


def free_disk(where: Path) -> int:
    where = Path(where)
    while not where.exists() and where != where.parent:
        where = where.parent
    return shutil.disk_usage(where).free


def check_disk(need: int, where: Path, what: str, advice: str) -> None:
    free = free_disk(where)
    if need > free * MARGIN:
        raise ResourceError(f"{what} needs {gb(need)} on disk but only {gb(free)} is free: {advice}")


def check_memory(need: int, what: str, advice: str) -> None:
    free = free_memory()
    if need > free * MARGIN:
        raise ResourceError(f"{what} needs about {gb(need)} of memory but the machine has {gb(free)} "
                            f"free: {advice}")


# ---------------------------------------------------------------- a model's activations

def _table_path() -> Path:
    return paths.home() / "cache" / "activations.json"


def activation_bytes(model, image_size: int, key: str) -> int:
    """fp32 bytes of every layer's output for one image at `image_size` (measured at a small size
    once per `key` and scaled by the area: convolution outputs grow with it)."""
    table = _read_table()
    if key not in table:
        table[key] = _measure(model)
        _write_table(table)
    return int(table[key] * (image_size / PROBE_SIZE) ** 2)


def _measure(model) -> int:
    import torch

    from core.hooks import eval_mode, hooked
    total = [0]

    def count(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            total[0] += output.numel()
    leaves = [m for m in model.modules() if not list(m.children())]
    device = next(model.parameters()).device
    with hooked((m, count) for m in leaves), eval_mode(model), torch.inference_mode():
        model(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE, device=device))
    return 4 * total[0]


def _read_table() -> dict:
    try:
        data = json.loads(_table_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_table(table: dict) -> None:
    path = _table_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.atomic_write_text(path, json.dumps(table))


def training_bytes(model, image_size: int, batch_size: int, trained_share: float, key: str) -> int:
    """Peak memory of one training step: weights, gradients and Adam's two moments of the trained
    share, plus the batch's activations (kept for backward where trained)."""
    params = sum(p.numel() for p in model.parameters()) * 4
    acts = activation_bytes(model, image_size, key) * batch_size
    kept = acts * (GRAD_FACTOR * trained_share + (1 - trained_share) * 0.25)
    return int(params * (1 + 3 * trained_share) + kept)


def largest_batch(model, image_size: int, trained_share: float, key: str, free: int) -> int:
    """The largest power-of-two batch that fits `free` bytes (0 when not even 1 does)."""
    batch = 1
    while batch <= 4096 and training_bytes(model, image_size, batch * 2, trained_share, key) <= free:
        batch *= 2
    return batch if training_bytes(model, image_size, batch, trained_share, key) <= free else 0


def check_training(model, arch: str, image_size: int, batch_size: int, trained_share: float, device) -> None:
    """Refuse, before the first batch, a step that can't fit this machine's free memory (CPU
    RAM; on a GPU, its free memory)."""
    key = f"{arch}"
    need = training_bytes(model, image_size, batch_size, trained_share, key)
    free = _device_free(device)
    if need <= free * MARGIN:
        return
    fits = largest_batch(model, image_size, trained_share, key, int(free * MARGIN))
    advice = (f"try batch size {fits} or lower" if fits >= 2 else "try a smaller image size") + \
        (" or freeze more of the model" if trained_share > 0.5 else "")
    where = "the GPU" if getattr(device, "type", "cpu") == "cuda" else "the machine"
    raise ResourceError(f"Batch size {batch_size} at {image_size} px needs about {gb(need)} of memory but "
                        f"{where} has {gb(free)} free: {advice}. Nothing was trained.")


def _device_free(device) -> int:
    if getattr(device, "type", "cpu") == "cuda":
        import torch
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return free_memory()

"""Device choice and mixed precision: CUDA, then Apple MPS, then CPU."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import threading
import time
from pathlib import Path

import torch


def pick_device(preference: str = "auto") -> torch.device:
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)} (bf16/fp16 autocast, channels_last)"
    if device.type == "mps":
        return "Apple GPU (MPS)"
    precision = "bf16 autocast" if cpu_bf16() else "fp32"
    return f"CPU ({torch.get_num_threads()} threads, {precision}, channels_last)"


def autocast(device: torch.device, precision: str | None = None):
    """Mixed precision for one step. `precision` is "fp32", "bf16" or "fp16" as chosen by
    `choose_precision`; None keeps the device default: bf16 autocast on GPUs that support it, fp16
    on older CUDA GPUs, on a CPU bf16 only where it measured faster (see `cpu_bf16`), none on MPS."""
    if precision is None:
        precision = default_precision(device)
    if precision == "fp32" or device.type == "mps":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def default_precision(device: torch.device) -> str:
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_bf16():
        return "bf16"
    return "fp32"


# ---------------------------------------------------------------- precision per model and step

_CHOSEN: dict[str, dict] = {}
_CHOSEN_LOCK = threading.Lock()


def precision_key(device: torch.device, arch: str, image_size: int, kind: str) -> str:
    """What a choice depends on: the processor (and its thread count), the model, the size and
    the kind of step ("train", "train@<cut block>", "infer")."""
    where = cpu_name() if device.type == "cpu" else device.type
    return f"{where}|{torch.get_num_threads()}t|{arch}|{image_size}|{kind}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def choose_precision(device: torch.device, key: str, step, store: Path | None = None,
                     repeats: int = 2) -> dict:
    """fp32 or bf16 for one kind of step of one model, by timing `step(precision)` (a callable
    that runs a few batches of the real model) in both, interleaved, best of `repeats`. GPUs use
    their autocast type without a trial; FINETUNE_LAB_CPU_BF16=0/1 forces a CPU's choice. The
    answer is kept per `key` in memory and in `store` (a JSON file), so each is timed once.
    Returns {"precision", "why", and the timings in seconds when measured}."""
    if device.type != "cpu":
        return dict(precision=default_precision(device), why=f"{device.type} autocast default")
    forced = os.environ.get("FINETUNE_LAB_CPU_BF16")
    if forced in ("0", "1"):
        return dict(precision="bf16" if forced == "1" else "fp32", why="set by FINETUNE_LAB_CPU_BF16")
    if not _has_bf16_flags():
        return dict(precision="fp32", why="this CPU has no bf16 instructions (bf16 would be emulated, "
                                          "several times slower)")
    with _CHOSEN_LOCK:
        if key not in _CHOSEN and store is not None:
            _CHOSEN.update(_read_json(store))
        if key in _CHOSEN:
            return dict(_CHOSEN[key], why="measured earlier on this machine")
    with torch.random.fork_rng(devices=[]):     # the trial must not shift a run's seeded RNG
        step("fp32"), step("bf16")               # warm-up: kernel choice, allocator
        fp32 = min(_timed(step, "fp32") for _ in range(repeats))
        bf16 = min(_timed(step, "bf16") for _ in range(repeats))
    # bf16 must clearly win: emulated bf16 on CPUs without native support is slower
    choice = dict(precision="bf16" if bf16 < 0.95 * fp32 else "fp32", fp32_s=round(fp32, 4),
                  bf16_s=round(bf16, 4))
    with _CHOSEN_LOCK:
        _CHOSEN[key] = choice
        if store is not None:
            _write_json(store, _CHOSEN)
    return dict(choice, why="measured now")


def _timed(step, precision: str) -> float:
    start = time.perf_counter()
    step(precision)
    return time.perf_counter() - start


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass      # a read-only data directory only costs a re-measurement next time


_CPU_BF16: dict[str, bool] = {}


def cpu_bf16() -> bool:
    """Whether bf16 autocast pays off on this CPU: it needs native bf16 instructions (AVX512-BF16
    or AMX) and must win a one-batch trial against fp32, since emulated bf16 is slower.
    FINETUNE_LAB_CPU_BF16=0/1 overrides."""
    forced = os.environ.get("FINETUNE_LAB_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if "ok" not in _CPU_BF16:
        with torch.random.fork_rng(devices=[]):     # the trial must not shift a run's seeded RNG
            _CPU_BF16["ok"] = _has_bf16_flags() and _bf16_trial()
    return _CPU_BF16["ok"]


def _has_bf16_flags() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _bf16_trial(repeats: int = 4) -> bool:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, 2, 1), torch.nn.ReLU(),
                              torch.nn.Conv2d(64, 128, 3, 2, 1), torch.nn.ReLU(),
                              torch.nn.Conv2d(128, 256, 3, 2, 1)).eval().to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 128, 128).contiguous(memory_format=torch.channels_last)

    def timed(ctx_factory):
        with torch.inference_mode(), ctx_factory():
            start = time.perf_counter()
            net(x)
        return time.perf_counter() - start

    with torch.inference_mode():
        net(x)                               # warm-up both: kernel selection, allocator
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(x)
    # interleaved, best of n: another busy process slows both sides alike and min() drops spikes
    fp32 = min(timed(contextlib.nullcontext) for _ in range(repeats))
    bf16 = min(timed(lambda: torch.autocast("cpu", dtype=torch.bfloat16)) for _ in range(repeats))
    return bf16 < 0.8 * fp32


def grad_scaler(device: torch.device):
    """fp16 needs loss scaling; bf16 and fp32 don't."""
    enabled = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda", enabled=enabled)


def set_cpu_threads() -> None:
    """Process-wide, so called once by whoever trains. Processes that torchrun starts on one
    machine share its cores instead of each taking all of them."""
    slot = os.environ.get("FINETUNE_LAB_THREADS", "")      # the executor's slot size
    if slot.isdigit() and int(slot) > 0:
        torch.set_num_threads(int(slot))
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))

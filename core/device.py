"""Device choice and mixed precision: CUDA, then Apple MPS, then CPU."""
from __future__ import annotations

import contextlib
import os

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


def autocast(device: torch.device):
    """bf16 autocast on GPUs that support it, fp16 on older CUDA GPUs; on a CPU, bf16 only where
    it measured faster than fp32 (see `cpu_bf16`); none on MPS."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if device.type == "cpu" and cpu_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
    import time
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
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))

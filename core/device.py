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
    return f"CPU ({os.cpu_count()} threads, fp32, channels_last)"


def autocast(device: torch.device):
    """bf16 autocast on GPUs that support it, fp16 on older CUDA GPUs, none on CPU/MPS."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def grad_scaler(device: torch.device):
    """fp16 needs loss scaling; bf16 and fp32 don't."""
    enabled = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler("cuda", enabled=enabled)


def set_cpu_threads() -> None:
    """Process-wide, so called once by whoever trains."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))

"""Frozen-prefix caching: when the lower blocks of a backbone are frozen, run them once per image,
keep their output, and train only the blocks above (and the head) on it.

The split works through timm's common contract and plain PyTorch, with no per-architecture code:
the backbone's `forward_features` is watched with forward pre-hooks to learn the order its blocks
run in (plain `nn.Sequential`/`nn.ModuleList` containers are opened, so a MobileNetV2's inverted
residuals or a ResNet's basic blocks are each one block). From the first block that has a
trainable parameter on, the blocks must form a chain (each one's input is the previous one's
output, then `forward_head`); that is checked numerically on a random image before it is used.
A model that is no chain there, or that does something random below the cut (dropout, drop-path),
is not split: it trains the normal way, and `Split.reason` says why.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core import rng
from core.device import autocast
from core.training import estimate
from core.hooks import eval_mode, hooked


class _Enough(Exception):
    """Raised by the capture hook: everything above the cut is not needed."""


def _openable(module: nn.Module) -> bool:
    """Containers whose call is exactly "call the children in order" (or that are never called)."""
    if isinstance(module, nn.ModuleList):
        return True
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _candidates(backbone: nn.Module):
    """(name, module) of every block the chain may be made of, containers opened."""
    stack = list(backbone.named_children())[::-1]
    while stack:
        name, module = stack.pop()
        if _openable(module) and len(module):
            stack += [(f"{name}.{child}", m) for child, m in module.named_children()][::-1]
        else:
            yield name, module


def _probe(backbone: nn.Module, image_size: int) -> torch.Tensor:
    param = next(backbone.parameters())
    return torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(param.device)


def block_chain(backbone: nn.Module, image_size: int) -> list[tuple[str, nn.Module]]:
    """The backbone's blocks in the order `forward_features` calls them (each called once)."""
    candidates = list(_candidates(backbone))
    calls: list[str] = []

    def recorder(name):
        return lambda _m, _args: calls.append(name)

    with eval_mode(backbone), torch.inference_mode(), hooked((), pre=[(m, recorder(n)) for n, m in candidates]):
        backbone.forward_features(_probe(backbone, image_size))
    by_name = dict(candidates)
    seen = set()
    chain = []
    for name in calls:
        if name in seen:         # a block run twice is no chain: stop before it
            break
        seen.add(name)
        chain.append((name, by_name[name]))
    return chain


def _random_inside(modules) -> str | None:
    """The first layer below the cut that behaves randomly (or keeps statistics) in training."""
    for top in modules:
        for m in top.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
                return f"dropout ({type(m).__name__})"
            if getattr(m, "drop_prob", 0) and float(m.drop_prob) > 0:
                return f"stochastic depth ({type(m).__name__})"
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not list(m.parameters(recurse=False)) \
                    and m.track_running_stats:
                return "a batch norm without parameters (its statistics would keep changing)"
    return None


@dataclass
class Split:
    """Where a backbone is cut: blocks[:cut] are the frozen prefix, blocks[cut:] train."""
    blocks: list = field(default_factory=list)      # [(name, module)] in call order
    cut: int = 0
    reason: str = ""                                 # why there is no usable split ("" when there is)

    @property
    def ok(self) -> bool:
        return not self.reason

    @property
    def cut_name(self) -> str:
        if not self.ok:
            return ""
        return self.blocks[self.cut][0] if self.cut < len(self.blocks) else "forward_head"


    @property
    def frozen_fraction(self) -> float:
        return self.cut / max(1, len(self.blocks))


def find_split(backbone: nn.Module, image_size: int) -> Split:
    """The cut just below the first block with a trainable parameter, checked to be exact."""
    try:
        chain = block_chain(backbone, image_size)
    except Exception as err:  # noqa: BLE001 - a model that can't be watched simply isn't split
        return Split(reason=f"its blocks could not be traced ({type(err).__name__}).")
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    if not trainable:
        return Split(chain, len(chain), reason="the whole backbone is frozen (the head-only feature "
                                               "cache applies instead).")
    first = next((i for i, (name, _) in enumerate(chain)
                  if any(p.startswith(name + ".") for p in trainable)), None)
    if first is None:            # only forward_head trains (e.g. VGG's pre-logits MLP)
        first = len(chain)
    if first == 0:
        return Split(chain, 0, reason="the lowest block trains, so there is no frozen part to cache.")
    above = tuple(name + "." for name, _ in chain[first:])
    below = tuple(name + "." for name, _ in chain[:first])
    stray = [p for p in trainable if not p.startswith(above) and (p.startswith(below) or "." not in p)]
    if stray:
        return Split(chain, first, reason=f"a trainable parameter ({stray[0]}) is used below the first "
                                          "trainable block.")
    noisy = _random_inside(m for _, m in chain[:first])
    if noisy:
        return Split(chain, first, reason=f"the frozen part has {noisy}, so its output changes "
                                          "from epoch to epoch.")
    split = Split(chain, first)
    if not _exact(backbone, split, image_size):
        return Split(chain, first, reason="from the first trainable block on, its forward pass is "
                                          "not a plain chain of blocks.")
    return split


def _exact(backbone: nn.Module, split: Split, image_size: int) -> bool:
    x = _probe(backbone, image_size)
    try:
        with eval_mode(backbone), torch.inference_mode():
            want = backbone(x)
            got = run_suffix(backbone, split, prefix_output(backbone, split, x))
    except Exception:  # noqa: BLE001 - e.g. a block that needs extra arguments
        return False
    scale = want.abs().max().clamp(min=1e-6)
    return got.shape == want.shape and bool(((got - want).abs().max() / scale) < 1e-4)


def prefix_output(backbone: nn.Module, split: Split, x: torch.Tensor) -> torch.Tensor:
    """The input of the first trainable block: the real forward pass, cut short there."""
    if split.cut == len(split.blocks):
        return backbone.forward_features(x)
    box = {}

    def capture(_m, args):
        box["x"] = args[0]
        raise _Enough()

    with hooked((), pre=[(split.blocks[split.cut][1], capture)]):
        try:
            backbone.forward_features(x)
        except _Enough:
            pass
    if "x" not in box:
        raise RuntimeError("The cut block was never reached.")
    return box["x"]


def run_suffix(backbone: nn.Module, split: Split, x: torch.Tensor) -> torch.Tensor:
    for _, block in split.blocks[split.cut:]:
        x = block(x)
    return backbone.forward_head(x)


class SuffixModel(nn.Module):
    """The trainable top of a FineTuneModel: cached prefix output in, logits out. It shares the
    model's modules (nothing is copied), so training it trains the model."""

    def __init__(self, model: nn.Module, split: Split):
        super().__init__()
        self.blocks = nn.ModuleList(m for _, m in split.blocks[split.cut:])
        self.head = model.head
        self._backbone = [model.backbone]      # a list: not registered twice as a submodule
        self._split = split

    def forward(self, x):
        x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        return self.head(run_suffix(self._backbone[0], self._split, x))


# ---------------------------------------------------------------- the cache itself

def ram_budget_bytes() -> int:
    """How much memory a cache may take before it goes to disk: FINETUNE_LAB_CACHE_RAM_MB, else
    a third of the memory available now."""
    forced = os.environ.get("FINETUNE_LAB_CACHE_RAM_MB")
    if forced:
        return int(float(forced) * 2**20)
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 // 3
    except (OSError, KeyError, ValueError):
        return 2 * 2**30


class Store:
    """N cached tensors of one shape, in fp16 (bf16 where values exceed fp16's range) in memory,
    or fp16/fp32 in a memory-mapped file when they would not fit."""

    def __init__(self, n: int, shape: tuple, half_ok: bool, disk: Path | None):
        self.n, self.shape = n, tuple(shape)
        if disk is None:
            self.data = torch.empty((n, *shape), dtype=torch.float16 if half_ok else torch.bfloat16)
        else:
            disk.parent.mkdir(parents=True, exist_ok=True)
            dtype = np.float16 if half_ok else np.float32      # numpy has no bf16
            need = n * math.prod(shape) * np.dtype(dtype).itemsize
            estimate.check_disk(need, disk.parent, "The frozen-layer cache", "lower the image size or the "
                         "augmented views, or free space in the data directory.")
            self.data = np.lib.format.open_memmap(disk, mode="w+", dtype=dtype, shape=(n, *shape))
            _reserve(disk, self)
        self.disk = disk

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def __del__(self):
        self.close()

    def put(self, start: int, values: torch.Tensor) -> None:
        values = values.detach().float().cpu()
        if self.data.dtype in (torch.float16, np.float16):    # fp16 was chosen on the first batch
            values = values.clamp(-65000, 65000)
        if isinstance(self.data, np.ndarray):
            self.data[start:start + len(values)] = values.numpy()
        else:
            self.data[start:start + len(values)] = values.to(self.data.dtype)

    def get(self, index) -> torch.Tensor:
        if isinstance(self.data, np.ndarray):
            return torch.from_numpy(np.asarray(self.data[np.asarray(index)])).float()
        return self.data[torch.as_tensor(index, dtype=torch.long)].float()

    def close(self) -> None:
        if getattr(self, "disk", None) is not None:      # __init__ may have refused before setting it
            self.data = None       # drop the memory map before its file goes
            with contextlib.suppress(OSError):
                self.disk.unlink()


def _reserve(path: Path, store: "Store") -> None:
    """Give the memory-mapped file real blocks now: a sparse file on a disk that fills up later
    kills the process with SIGBUS on the first write past the free space, which no handler
    catches; allocating up front fails here, with a sentence, instead."""
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except AttributeError:      # no posix_fallocate (macOS): the free-space check above must do
        pass
    except OSError as err:
        store.close()
        raise estimate.ResourceError("The frozen-layer cache can't be written: the disk is full. Lower the "
                              "image size or the augmented views, or free space.") from err


def bytes_per_image(backbone: nn.Module, split: Split, image_size: int) -> int:
    """Cache bytes per image at this cut (2-byte floats)."""
    with eval_mode(backbone), torch.inference_mode():
        out = prefix_output(backbone, split, _probe(backbone, image_size)[:1])
    return 2 * math.prod(out.shape[1:])


@torch.inference_mode()
def compute(backbone: nn.Module, split: Split | None, images, transform, device, views: int = 1,
            batch_size: int = 64, progress=None, disk: Path | None = None, precision: str | None = None,
            stream: rng.Stream | None = None) -> Store:
    """`views` passes over `images` (through `transform`, random when it augments): the prefix
    output at `split`, or the whole backbone's pooled features when `split` is None. Row
    v * len(images) + i holds view v of image i. `progress(done, total)` may raise to stop; a
    half-written file is then removed."""
    n = len(images)
    store = None
    total, done = views * n, 0
    try:
        with eval_mode(backbone):
            for view in range(views):
                for start in range(0, n, batch_size):
                    with rng.active(stream):      # augmented views draw the run's own numbers
                        batch = torch.stack([transform(img) for img in images[start:start + batch_size]])
                    batch = batch.to(device, memory_format=torch.channels_last)
                    with autocast(device, precision):
                        out = backbone(batch) if split is None else prefix_output(backbone, split, batch)
                    out = out.float()
                    if store is None:
                        store = Store(total, out.shape[1:], bool(out.abs().max() < 6e4), disk)
                    store.put(view * n + start, out)
                    done += len(batch)
                    if progress:
                        progress(done, total)
    except BaseException:
        if store is not None:
            store.close()
        raise
    return store if store is not None else Store(0, (0,), True, None)

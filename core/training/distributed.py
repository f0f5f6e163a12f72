"""Data-parallel training through torch.distributed, as launched by `torchrun`.

Outside torchrun everything here is a no-op for a world of one process, so the training loop
has a single code path: it always shards batches by rank, and a world of one gets them all.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler


def launched() -> bool:
    """True inside `torchrun --nproc_per_node>1` (or a multi-node launch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """NCCL between GPUs, Gloo between CPU processes; the rendezvous comes from torchrun's env."""
    if not launched() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_all(*values: float) -> list[float]:
    """Sums across ranks (loss totals, correct counts) so every rank logs global numbers."""
    if not active():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def local_batch(global_batch: int) -> int:
    """Each rank's share of the global batch, so N processes take the same optimiser steps as one."""
    if global_batch % world():
        raise ValueError(f"Batch size {global_batch} does not split evenly over {world()} processes; "
                         f"pick a multiple of {world()}.")
    return global_batch // world()


def train_sampler(n: int, seed: int) -> DistributedSampler:
    """This rank's shuffled share of n items; call set_epoch(e) before each epoch. One process
    and N processes draw the same permutation (seed + epoch), and rank r takes every N-th index,
    so the union of the ranks' k-th batches is the single process's k-th batch."""
    return DistributedSampler(range(n), num_replicas=world(), rank=rank(), shuffle=True, seed=seed)


def train_order(n: int, seed: int, epoch: int) -> list[int]:
    sampler = train_sampler(n, seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def eval_order(n: int) -> list[int]:
    """Every index exactly once across ranks (no padding, so sums stay exact)."""
    return list(range(rank(), n, world()))


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel when launched (it averages gradients across ranks), else as is."""
    if not active() or not any(p.requires_grad for p in module.parameters()):
        return module
    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)

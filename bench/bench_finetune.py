"""Fast fine-tuning rows of the benchmark (called by benchmark.py; runnable alone):

    python bench/bench_finetune.py                 # all three rows (about 15 minutes on 2 cores)
    python bench/bench_finetune.py --quick         # no budget-vs-full comparison (about 2 minutes)
    python bench/bench_finetune.py --data ../shared/datasets/eurosat_rgb --budget 300

1. a top-2-blocks fine-tuning epoch on the frozen-prefix cache vs the same epoch without it;
2. the precision the app chooses vs the faster of fp32/bf16, per model (training steps);
3. "Best accuracy in 5 minutes" (the shipped preset) vs a 10-epoch full fine-tune, same split.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch
from torch import nn

from core.data import folders
from core.data import images as imaging
from core.data import transforms
from core import device as devices
from core.models import prefix
from core.models.backbones import apply_freeze, build_model, freeze_norm_stats
from core.training.distributed import train_order
from core.training.steps import feature_batches, loader, run_epoch

SHARED = ROOT.parent / "shared" / "datasets"


def _record(record, *args, **kwargs):
    (record or _print)(*args, **kwargs)


def _print(name, value, unit, target="", ok=None):
    status = "" if ok is None else "PASS" if ok else "FAIL"
    print(f"{name:<62} {value:>10.2f} {unit:<8} {target:<12} {status}", flush=True)


def _no_report(*_a, **_k):
    pass


def _demo(size: int, n: int):
    scan = folders.scan_folder(folders.demo_dataset())
    items = (scan.items * (n // len(scan.items) + 1))[:n]
    images, _ = imaging.decode_images(scan.root, items, size)
    return images, [it.label for it in items], len(scan.classes)


def bench_prefix(record=None, size: int = 160, n: int = 512, rounds: int = 3) -> float:
    """Top-2 blocks of MobileNetV2: one epoch through the whole network (what trains without the
    cache) vs one epoch of the top blocks on cached prefix outputs; rounds interleaved."""
    images, labels, classes = _demo(size, n)
    model = build_model("mobilenetv2_100", classes, "auto").to(memory_format=torch.channels_last)
    apply_freeze(model, "top_k", 2)
    split = prefix.find_split(model.backbone, size)
    tf = transforms.build_transform(size, (0.5,) * 3, (0.5,) * 3)
    device, criterion = torch.device("cpu"), nn.CrossEntropyLoss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    start = time.perf_counter()
    store = prefix.compute(model.backbone, split, images, tf, device)
    build = time.perf_counter() - start
    suffix = prefix.SuffixModel(model, split)

    def epoch(cached: bool) -> float:
        net = suffix if cached else model
        net.train()
        freeze_norm_stats(model)
        batches = (feature_batches(store, labels, 32, train_order(n, 0, 0)) if cached
                   else loader(images, labels, tf, 32, train_order(n, 0, 0)))
        t = time.perf_counter()
        run_epoch(net, batches, criterion, opt, scaler, device, _no_report, 1, 1, n // 32)
        return time.perf_counter() - t

    epoch(True), epoch(False)                               # warm-up
    pairs = [(epoch(False), epoch(True)) for _ in range(rounds)]
    ratio = statistics.median(plain / cached for plain, cached in pairs)
    _record(record, f"top-2 blocks epoch, no cache ({n} imgs, {size}px)", statistics.median(p for p, _ in pairs), "s")
    _record(record, f"top-2 blocks epoch on the prefix cache (built once in {build:.1f} s)",
            statistics.median(c for _, c in pairs), "s")
    _record(record, "prefix cache speed-up, MobileNetV2 top-2 epoch", ratio, "x", ">= 5", ratio >= 5)
    return ratio


def bench_precision(record=None, size: int = 128, batch: int = 16, repeats: int = 3) -> None:
    """For each model, time a training step in fp32 and bf16 (interleaved, best of `repeats`),
    then ask the app for its choice; the ratio is the faster one's time over the chosen one's."""
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    device = torch.device("cpu")
    for arch in ("mobilenetv2_100", "tf_efficientnet_lite0", "resnet18"):
        model = build_model(arch, 10, "random").to(memory_format=torch.channels_last).train()

        def step(precision, model=model):
            with devices.autocast(device, precision):
                loss = nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            model.zero_grad(set_to_none=True)

        step("fp32"), step("bf16")
        times = {p: min(devices._timed(step, p) for _ in range(repeats)) for p in ("fp32", "bf16")}
        devices._CHOSEN.clear()
        chosen = devices.choose_precision(device, f"bench|{arch}", step)["precision"]
        ratio = min(times.values()) / times[chosen]
        _record(record, f"precision {arch}: fp32 {times['fp32']:.2f} s, bf16 {times['bf16']:.2f} s/step; chose {chosen}",
                ratio, "ratio", ">= 0.95", ratio >= 0.95)


def bench_budget(record=None, data: str | None = None, budget: int = 300) -> dict:
    """The shipped "Best accuracy in 5 minutes" preset vs a 10-epoch full fine-tune (AdamW 3e-4,
    cosine, same augmentation, same split and seed), each timed from a cold start of the run."""
    from core import train
    from core.serve.presets import parse_preset
    from core.config import RunConfig
    data = data or str(SHARED / "eurosat_rgb" if (SHARED / "eurosat_rgb").is_dir() else folders.demo_dataset())
    preset = parse_preset((ROOT / "assets" / "presets" / "lab-best-in-5-minutes.json").read_bytes())["settings"]
    budget_cfg = RunConfig.from_dict(dict(preset, data_root=data, time_budget_s=budget))
    full_cfg = RunConfig.from_dict(dict(preset, data_root=data, time_budget_s=0, freeze="full", epochs=10,
                                        lr=3e-4, aug_views=0))
    out = {}
    with tempfile.TemporaryDirectory() as home:
        os.environ["FINETUNE_LAB_HOME"] = home
        for name, cfg in (("budget", budget_cfg), ("full10", full_cfg)):
            start = time.perf_counter()
            run = train(cfg)
            status = run.status()
            out[name] = dict(seconds=time.perf_counter() - start, test_acc=status.get("test_acc"),
                             state=status.get("state"), plan=run.read_json("plan.json"))
    label = Path(data).name
    _record(record, f"'{budget // 60} min' preset on {label}: wall time", out["budget"]["seconds"], "s",
            f"<= {budget}", out["budget"]["seconds"] <= budget)
    _record(record, "  its test accuracy", out["budget"]["test_acc"] or 0, "acc")
    _record(record, f"10-epoch full fine-tune on {label}: wall time", out["full10"]["seconds"], "s")
    _record(record, "  its test accuracy", out["full10"]["test_acc"] or 0, "acc")
    gap = (out["full10"]["test_acc"] or 0) - (out["budget"]["test_acc"] or 0)
    _record(record, "budget preset: points below the full fine-tune", 100 * gap, "points", "<= 1", gap <= 0.01)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", default=None, help="class-per-folder data set for the budget row")
    parser.add_argument("--budget", type=int, default=300)
    parser.add_argument("--only", choices=("prefix", "precision", "budget"), default=None)
    args = parser.parse_args()
    devices.set_cpu_threads()
    if args.only in (None, "prefix"):
        bench_prefix()
    if args.only in (None, "precision"):
        bench_precision()
    if args.only == "budget" or (args.only is None and not args.quick):
        print(json.dumps(bench_budget(data=args.data, budget=args.budget), indent=1, default=str))


if __name__ == "__main__":
    main()

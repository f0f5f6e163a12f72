"""Evaluation throughput: decode + predict N test images with the default backbone on this machine.

    python bench/bench_eval.py [N]
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from core.data import folders
from core.data import images as imaging
from core.data import transforms
from core.models.backbones import build_model
from core.models.backbones import data_config
from core.results.evaluate import predict_probs, summarize


def main(n: int = 2000, size: int = 128):
    scan = folders.scan_folder(folders.demo_dataset())
    items = (scan.items * (n // len(scan.items) + 1))[:n]
    t0 = time.perf_counter()
    images, _ = imaging.decode_images(scan.root, items, size)
    t1 = time.perf_counter()
    model = build_model("mobilenetv2_100", len(scan.classes), "auto").eval()
    model.to(memory_format=torch.channels_last)
    dc = data_config(model, size)
    probs = predict_probs(model, images, transforms.build_transform(size, dc["mean"], dc["std"]), torch.device("cpu"))
    t2 = time.perf_counter()
    summarize(probs, [it.label for it in items], scan.classes)
    t3 = time.perf_counter()
    print(f"{n} images at {size}px, {torch.get_num_threads()} threads: decode {t1 - t0:.1f}s, "
          f"predict {t2 - t1:.1f}s ({n / (t2 - t1):.0f} img/s), metrics {t3 - t2:.2f}s, total {t3 - t0:.1f}s")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))

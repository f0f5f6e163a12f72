"""Checked explanations: the time of Inspect's sanity check (core.trust.sanity) for one photo.

    python bench/bench_trust_sanity.py

MobileNetV2 with the bundled weights, a 128 px photo, the three attribution methods on the
original model, the top block randomised, all weights randomised and a head fit to shuffled
labels (on 300 stand-in training features: computing real ones is the embedding benchmark's job).
One timed call after a warm-up, no loop: the lead runs benchmarks on a quiet machine.
"""
from __future__ import annotations

import sys
from PIL import Image
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from core.data import images as imaging
from core.data import transforms
from core.results import inspection
from core import rng
from core.trust import sanity
from core.models.backbones import build_model

TARGET_S = 15       # three times the attributions row (<= 5 s) plus the copies and the head fit


def bench_sanity(record, size: int = 128) -> None:
    from skimage import data as photos
    with rng.Stream(0).active():        # the new head's init: the same verdicts on every run
        model = build_model("mobilenetv2_100", 10, "bundled").eval()
    image = np.array(imaging.to_rgb(Image.fromarray(photos.chelsea())).resize((size, size)))
    x = transforms.build_transform(size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(
        torch.from_numpy(image).permute(2, 0, 1).contiguous())[None]
    draw = np.random.default_rng(0)
    features = (draw.random((300, model.backbone.num_features), dtype=np.float32),
                draw.integers(0, 10, 300))
    inspection.attribution_maps(model, x, 0, methods=("Grad-CAM",))          # warm-up: captum's imports
    steps: dict[str, float] = {}
    mark = {"text": "", "t": time.perf_counter()}

    def progress(_done, _total, text):          # time per step, split at each change of model
        step = text.split(":")[0].rstrip("…")
        now = time.perf_counter()
        if mark["text"]:
            steps[mark["text"]] = steps.get(mark["text"], 0.0) + now - mark["t"]
        mark.update(text=step, t=now)

    start = time.perf_counter()
    rows = sanity.sanity_check(model, x, 0, train_features=features, progress=progress)
    total = time.perf_counter() - start
    for step, seconds in steps.items():
        if step != "Done":
            record(f"  sanity check: {step} ({size} px) (s)", seconds, "s")
    record(f"sanity check, 3 methods x 4 models, one {size} px image (s)", total, "s",
           f"<= {TARGET_S}", total <= TARGET_S)
    for verdict in sanity.verdicts(rows):
        print(f"    {verdict['text']}")


def _print(name, value, unit, target="", ok=None):
    status = "" if ok is None else "PASS" if ok else "FAIL"
    print(f"{name:<62} {value:>10.2f} {unit:<8} {target:<12} {status}", flush=True)


if __name__ == "__main__":
    bench_sanity(_print)

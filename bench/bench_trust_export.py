"""Checked export: how long checking an export takes on 200 test images.

    python bench/bench_trust_export.py

A MobileNetV2 run (bundled weights, 128 px, 10 demo classes) is put together from the model
itself, without training: the check compares the export with the run's checkpoint, so what
the weights have learned does not matter, only how long the comparison takes. Each check
decodes the 200 images, runs the checkpoint and the export on them and compares.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import safetensors.torch
import torch

from core.data import folders
from core.trust import export_check
from core.models.backbones import build_model, load_run_model
from core.config import RunConfig
from core.models.export import export_onnx, export_run
from core.serve.store import Run

TARGET_S = 10.0
N_IMAGES = 200


def mobilenet_run(root: Path, size: int = 128, n: int = N_IMAGES) -> Run:
    """A finished-looking run whose test split is `n` demo images."""
    scan = folders.scan_folder(folders.demo_dataset())
    cfg = RunConfig(arch="mobilenetv2_100", weights="bundled", image_size=size,
                    data_root=str(scan.root), device="cpu")
    run = Run.create(cfg, root=root)
    model = build_model(cfg.arch, len(scan.classes), "bundled")
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run.checkpoint))
    run.write_json("classes.json", scan.classes)
    test = [[it.path, it.label] for it in scan.items[:: max(1, len(scan.items) // n)][:n]]
    run.write_json("splits.json", dict(root=str(scan.root), train=[], val=[], test=test))
    run.set_status("finished")
    return run


def bench_export_check(record) -> None:
    """record(name, value, unit, target, ok) per format: seconds for the whole check of 200
    test images (decode, checkpoint, export, compare), and the export's ms per image."""
    with tempfile.TemporaryDirectory() as tmp:
        run = mobilenet_run(Path(tmp))
        out = run.file("export")
        weights, _info = export_run(run, out)
        onnx = export_onnx(load_run_model(run), run.config.image_size, out / "model.onnx")
        for kind, path in (("safetensors", weights), ("onnx", onnx)):
            export_check._LAST.clear()         # each check from cold: decode, checkpoint, export
            start = time.perf_counter()
            result = export_check.check_export(run, kind, path)
            seconds = time.perf_counter() - start
            name = f"export check {kind}, {result['n']} test images, MobileNetV2 128px"
            record(name, seconds, "s", f"<= {TARGET_S:.0f} s", seconds <= TARGET_S and result["ok"])
            record(f"  {kind} export inference", result["ms_per_image"], "ms/img")


def print_record(name: str, value: float, unit: str, target: str = "", ok: bool | None = None) -> None:
    status = "" if ok is None else "PASS" if ok else "FAIL"
    print(f"{name:<62} {value:>10.2f} {unit:<8} {target:<12} {status}", flush=True)


if __name__ == "__main__":
    print(f"{torch.get_num_threads()} threads")
    bench_export_check(print_record)

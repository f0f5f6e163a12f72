"""Check an export right after it is written: load it the way a user would (safetensors + JSON
through core.models.predict.from_export, ONNX through onnxruntime), run it on the run's test images
and compare with the run's own PyTorch model on the very same preprocessed tensors.

An export passes when it picks the same top-1 class as PyTorch on every checked image and no
probability differs by more than TOLERANCE. Float32 round-off between PyTorch and onnxruntime
stays near 1e-6; a wrong weight, a missing normalisation or a swapped class order moves
probabilities by far more than 1e-3, so the threshold separates the two with room on both
sides. The results are kept in the export folder's check.json, one entry per format.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from core.data import folders
from core.data import images as imaging
from core.data import transforms
from core import paths
from core.models.backbones import load_run_model, run_normalization
from core.progress import Progress, batched_forward, part, silent
from core.serve.store import Run

TOLERANCE = 1e-3          # largest probability difference that still counts as the same model
MAX_IMAGES = 200          # enough to catch a broken export, few enough to check in seconds
BATCH = 32
FILES = {"safetensors": "model.safetensors", "onnx": "model.onnx"}

class CheckSet(NamedTuple):
    split: str                      # "test", or "val" for a run without test images
    images: list[torch.Tensor]      # decoded uint8 CHW at the run's image size
    available: int                  # images in the split (before the cap and unreadable files)


def check_images(run: Run, limit: int = MAX_IMAGES, progress: Progress | None = None) -> CheckSet:
    """Up to `limit` readable images of the run's test split (val when test is empty), spread
    evenly over the split, which lists its images class by class."""
    splits = run.read_json("splits.json", {}) or {}
    split = "test" if splits.get("test") else "val"
    items = [folders.Item(p, label) for p, label in splits.get(split, [])]
    if len(items) > limit:
        items = [items[int(i)] for i in np.linspace(0, len(items) - 1, limit).round()]
    say = progress or silent
    say(0, 100, f"Reading {len(items)} {split} images…")
    images, _failures = imaging.decode_images(splits.get("root", "."), items, run.config.image_size,
                                              progress=part(say, 0.0, 0.2, f"Reading {split} images"))
    return CheckSet(split, [img for img in images if img is not None], len(splits.get(split, [])))


def check_export(run: Run, kind: str, path: str | Path, images: CheckSet | None = None,
                 progress: Progress | None = None) -> dict:
    """Run the export at `path` ("safetensors" or "onnx") next to the run's checkpoint on the
    check images (default: check_images(run)); returns the result (see check_line) and stores
    it in the folder's check.json."""
    path = Path(path)
    say = progress or silent
    result = dict(kind=kind, file=path.name, size_bytes=_size(path), split="test", available=0, n=0,
                  agree=0, agreement=0.0, max_prob_diff=None, ms_per_image=None, tolerance=TOLERANCE,
                  problem="", file_mtime=_mtime(path), checkpoint_mtime=_mtime(run.checkpoint),
                  checked_at=time.time())
    try:
        result.update(_compare(run, kind, path, images, say))
    except Exception as err:  # noqa: BLE001 - a broken export is a result to show, not a crash
        result["problem"] = f"it could not be run ({type(err).__name__}: {str(err)[:300]})"
    result["ok"] = not result["problem"]
    save_check(path.parent, result)
    say(100, 100, "Checked.")
    return result


# The images and the checkpoint's probabilities of the last run checked: checking the ONNX
# export right after the safetensors one then costs only the ONNX half.
_LAST: dict = {}          # {key: value}, one entry


def _reference(run: Run, images: CheckSet | None, say: Progress):
    """(images, checkpoint probabilities, transform) for the check."""
    key = (str(run.path), _mtime(run.checkpoint), _mtime(run.file("splits.json")))
    if images is None and (hit := _LAST.get(key)) is not None:
        return hit
    cached = images is None
    images = images or check_images(run, progress=say)
    model = load_run_model(run).to(memory_format=torch.channels_last)
    mean, std = run_normalization(run, model)
    transform = transforms.build_transform(run.config.image_size, mean, std)
    # fp32 on the CPU: the reference must not carry autocast's round-off into the comparison
    logits = batched_forward(model, images.images, BATCH, "cpu", precision="fp32",
                             progress=part(say, 0.2, 0.6, f"Checking on {len(images.images)} {images.split} "
                                                          "images with the trained model"),
                             prepare=lambda chunk: torch.stack([transform(img) for img in chunk]))
    probs = logits.softmax(-1).numpy() if len(logits) else np.zeros((0, 0))
    value = images, probs, transform, (list(mean), list(std))
    if cached:
        _LAST.clear()
        _LAST[key] = value
    return value


@torch.inference_mode()
def _compare(run: Run, kind: str, path: Path, images: CheckSet | None, say: Progress) -> dict:
    meta = json.loads((path.parent / "model.json").read_text(encoding="utf-8"))
    images, ref, transform, (mean, std) = _reference(run, images, say)
    found = dict(split=images.split, available=images.available, n=len(images.images))
    mismatch = _meta_mismatch(run, meta, mean, std)
    if mismatch or not images.images:
        return dict(found, problem=mismatch or f"the run has no readable {images.split} images to check it on")
    export = _runner(kind, path, meta)
    # warm-up at the batch shape, so the timing leaves out one-off kernel set-up
    export(torch.stack([transform(img) for img in images.images[:BATCH]]))
    n, got, seconds = len(images.images), [], 0.0
    tick = part(say, 0.6, 1.0, f"Checking on {n} {images.split} images")
    for start in range(0, n, BATCH):
        batch = torch.stack([transform(img) for img in images.images[start:start + BATCH]])
        t0 = time.perf_counter()
        got.append(export(batch))
        seconds += time.perf_counter() - t0
        tick(min(start + BATCH, n), n)
    got = np.concatenate(got)
    agree, diff = int((ref.argmax(1) == got.argmax(1)).sum()), float(np.abs(ref - got).max())
    problem = ""
    if agree < n:
        problem = f"it picks a different class than the trained model on {n - agree} of {n} images"
    elif not diff <= TOLERANCE:      # also NaN
        problem = f"its probabilities differ from the trained model's by up to {diff:.2g}"
    return dict(found, agree=agree, agreement=agree / n, max_prob_diff=diff, ms_per_image=1000 * seconds / n,
                problem=problem)


def _runner(kind: str, path: Path, meta: dict) -> Callable[[torch.Tensor], np.ndarray]:
    """batch -> softmax probabilities, through the export as a user would load it."""
    if kind == "safetensors":
        from core.models.predict import from_export
        model = from_export(path, meta).model.eval().to(memory_format=torch.channels_last)
        return lambda x: model(x.contiguous(memory_format=torch.channels_last)).float().softmax(-1).numpy()
    if kind == "onnx":
        import onnxruntime
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0]).float().softmax(-1).numpy()
    raise ValueError(f"Unknown export kind {kind!r}; expected one of {sorted(FILES)}.")


def _meta_mismatch(run: Run, meta: dict, mean, std) -> str:
    """The export's model.json must describe the run: its preprocessing is what users apply."""
    expected = dict(classes=run.classes, image_size=run.config.image_size, mean=list(mean), std=list(std))
    for key, value in expected.items():
        got = meta.get(key)
        if key in ("classes", "image_size"):
            same = got == value
        else:
            same = (isinstance(got, list) and len(got) == 3
                    and all(math.isclose(a, b, abs_tol=1e-7) for a, b in zip(got, value)))
        if not same:
            return f"model.json's {key} ({str(got)[:80]}) is not the run's ({str(value)[:80]})"
    return ""


# ---------------------------------------------------------------- results

def save_check(folder: Path, result: dict) -> None:
    """Add or replace this format's entry in folder/check.json."""
    checks = _read(folder)
    checks[result["kind"]] = result
    paths.atomic_write_text(folder / "check.json", json.dumps(checks, indent=1))


def load_checks(folder: str | Path, run: Run | None = None) -> dict[str, dict]:
    """Stored results by format, only those whose file is still the one that was checked (and,
    given the run, whose checkpoint is still the run's: a resumed run may have moved on)."""
    folder = Path(folder)
    return {kind: r for kind, r in _read(folder).items()
            if kind in FILES and r.get("file_mtime") == _mtime(folder / r.get("file", FILES[kind]))
            and (run is None or r.get("checkpoint_mtime") == _mtime(run.checkpoint))}


def _read(folder: Path) -> dict:
    try:
        data = json.loads((folder / "check.json").read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def check_line(result: dict) -> str:
    """'agrees on 100% of 200 test images · max prob. difference 2e-06 · 3.1 ms/image · 9.1 MB',
    or what is wrong."""
    size = f"{result['size_bytes'] / 1e6:.1f} MB"
    images = f"{result['n']} {result['split']} images"
    if result["max_prob_diff"] is None:
        return f"not checked: {result['problem']} · {size}"
    line = (f"max prob. difference {result['max_prob_diff']:.1g} · {result['ms_per_image']:.1f} ms/image "
            f"· {size}")
    if result["n"] < result["available"]:
        line += f" · {result['n']} of the {result['available']} {result['split']} images checked"
    if result["ok"]:
        return f"agrees on 100% of {images} · {line}"
    return f"flagged: {result['problem']} (agrees on {result['agreement']:.1%} of {images}) · {line}"


def export_checked(run: Run, kind: str, out_dir: str | Path | None = None,
                   progress: Progress | None = None) -> dict:
    """Write one export format into `out_dir` (default: the run's export folder), then check it.
    ONNX needs the safetensors export's model.json next to it, so that is written first when
    missing. RuntimeError when the architecture can't be exported to ONNX."""
    from core.models.export import export_onnx, export_run
    say = progress or silent
    out = Path(out_dir or run.file("export"))
    say(0, 100, "Writing…")
    if kind == "safetensors" or not (out / "model.json").exists():
        path, _info = export_run(run, out)
    if kind == "onnx":
        path = export_onnx(load_run_model(run), run.config.image_size, out / FILES["onnx"])
    return check_export(run, kind, path, progress=say)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None

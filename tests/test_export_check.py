"""Checked export (core.trust.export_check): every export is run on the run's test images right after
it is written and compared with the trained model; the predict.py scripts written next to it
reproduce the app's predictions; the Evaluate page shows the verdict and holds back a flagged
export; the CLI prints it.

One tiny run (test_resnet, 32 px, linear head, so timm's own key layout) is trained once per
module outside any test's lab home; tests work on copies.
"""
from __future__ import annotations

import contextlib
import csv
import io
import runpy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from apptest_helpers import assert_ok, opened
from conftest import class_folders, class_image, tiny_run_config, train_apart
from core.trust import export_check
from core import paths
from core.models import predict
from core.serve.store import Run, get_run

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Run:
    base = tmp_path_factory.mktemp("export_check")
    return train_apart(tiny_run_config(class_folders(base / "data")), base)


@pytest.fixture
def run(trained, tmp_path) -> Run:
    """A private copy of the trained run."""
    shutil.copytree(trained.path, tmp_path / trained.id)
    return Run(tmp_path / trained.id)


def perturb(weights: Path) -> None:
    """Change one weight tensor a little, as a broken conversion or a bad copy would."""
    state = safetensors.torch.load_file(str(weights))
    name = next(k for k in state if k.endswith("fc.weight") or k.endswith("head.1.weight"))
    noise = torch.randn(state[name].shape, generator=torch.Generator().manual_seed(0))
    state[name] = state[name] + 0.5 * state[name].abs().mean() * noise
    safetensors.torch.save_file(state, str(weights), metadata={"format": "pt"})


# ---------------------------------------------------------------- core

@pytest.mark.slow
def test_safetensors_and_onnx_exports_agree(run):
    import onnxruntime  # noqa: F401 - a runtime requirement: a broken install must fail, not skip
    seen = []
    first = export_check.export_checked(run, "safetensors", progress=lambda d, t, text: seen.append((text, d / t)))
    second = export_check.export_checked(run, "onnx")
    n = len(run.read_json("splits.json")["test"])
    for result in (first, second):
        assert result["ok"], result
        assert result["n"] == n and result["agree"] == n and result["agreement"] == 1.0
        assert result["max_prob_diff"] < 1e-5 and result["ms_per_image"] > 0
        assert result["size_bytes"] == run.file("export").joinpath(result["file"]).stat().st_size
        assert export_check.check_line(result).startswith(f"agrees on 100% of {n} test images · max prob. difference")
    assert seen[0] == ("Writing…", 0.0) and seen[-1][1] == 1.0
    assert any(text == f"Checking on {n} test images {n}/{n}" for text, _ in seen)
    assert set(export_check.load_checks(run.file("export"), run)) == {"safetensors", "onnx"}
    for name in ("model.safetensors", "model.json", "predict.py", "model.onnx", "predict_onnx.py"):
        assert run.file("export").joinpath(name).is_file(), name


def test_a_perturbed_export_is_flagged(run):
    export_check.export_checked(run, "safetensors")
    perturb(run.file("export/model.safetensors"))
    assert "safetensors" not in export_check.load_checks(run.file("export")), "the old verdict is stale"
    result = export_check.check_export(run, "safetensors", run.file("export/model.safetensors"))
    assert not result["ok"] and result["max_prob_diff"] > export_check.TOLERANCE
    assert export_check.check_line(result).startswith("flagged: ")
    assert export_check.load_checks(run.file("export"))["safetensors"]["ok"] is False


def test_a_broken_file_or_wrong_model_json_is_flagged(run):
    export_check.export_checked(run, "safetensors")
    folder = run.file("export")
    meta = folder.joinpath("model.json").read_text()
    folder.joinpath("model.json").write_text(json.dumps(dict(json.loads(meta), mean=[0.1, 0.1, 0.1])))
    result = export_check.check_export(run, "safetensors", folder / "model.safetensors")
    assert not result["ok"] and "mean" in result["problem"]
    folder.joinpath("model.json").write_text(meta)
    folder.joinpath("model.safetensors").write_bytes(b"not a safetensors file")
    result = export_check.check_export(run, "safetensors", folder / "model.safetensors")
    assert not result["ok"] and "could not be run" in result["problem"]
    assert export_check.check_line(result).startswith("not checked: ")


def test_check_images_caps_and_spreads_over_the_split(run):
    test = run.read_json("splits.json")["test"]
    picked = export_check.check_images(run, limit=3)
    assert picked.split == "test" and picked.available == len(test) and len(picked.images) == 3


# ---------------------------------------------------------------- predict.py

def odd_images(folder: Path) -> list[Path]:
    """Images that take every branch of the app's decoding: PNG, a big JPEG (draft decode and
    whole-factor reduce), an EXIF-rotated JPEG, RGBA on white, grayscale, palette."""
    folder.mkdir()
    files = []
    def save(img: Image.Image, name: str, **kw) -> None:
        img.save(folder / name, **kw)
        files.append(folder / name)
    save(class_image(0, 500), "plain.png")
    save(class_image(1, 501, (300, 220)), "big.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6                                  # rotate 90°
    save(class_image(2, 502, (90, 60)), "turned.jpg", exif=exif.tobytes())
    rgba = class_image(1, 503, 50).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((50, 50)))
    save(rgba, "alpha.png")
    save(class_image(2, 504, (40, 70)).convert("L"), "gray.png")
    save(class_image(0, 505, 45).convert("P"), "palette.gif")
    return files


def script_probs(script: Path, files: list[Path], in_process: bool = False) -> tuple[list[str], np.ndarray]:
    """The script's CSV as (predicted classes, probabilities); run as a user would, or (faster,
    torch already imported) in this process."""
    if in_process:
        out = io.StringIO()
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
            mp.setattr(sys, "argv", [str(script), *map(str, files)])
            runpy.run_path(str(script), run_name="__main__")
        out = out.getvalue()
    else:
        out = subprocess.run([sys.executable, str(script), *map(str, files)], capture_output=True,
                             text=True, timeout=180, check=True).stdout
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0][:3] == ["file", "predicted", "confidence"]
    return [r[1] for r in rows[1:]], np.array([[float(v) for v in r[3:]] for r in rows[1:]])


@pytest.mark.slow
def test_predict_scripts_reproduce_the_apps_predictions(run, tmp_path):
    export_check.export_checked(run, "safetensors")
    files = odd_images(tmp_path / "images")
    app = predict.predict_files(predict.from_run(run), files)
    expected = app[[f"p_{c}" for c in run.classes]].to_numpy()
    predicted, probs = script_probs(run.file("export/predict.py"), files)
    assert predicted == list(app["predicted"])
    np.testing.assert_allclose(probs, expected, atol=2e-6)
    import onnxruntime  # noqa: F401 - a runtime requirement: a broken install must fail, not skip
    export_check.export_checked(run, "onnx")
    predicted, probs = script_probs(run.file("export/predict_onnx.py"), files)
    assert predicted == list(app["predicted"])
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_predict_script_for_an_mlp_head(tmp_path):
    """The other key layout: the app's own backbone + head names, rebuilt with plain torch."""
    base = tmp_path / "mlp"
    run = train_apart(tiny_run_config(class_folders(base / "data", per_class=6), head="mlp", hidden=16, epochs=1), base)
    result = export_check.export_checked(run, "safetensors")
    assert result["ok"], result
    assert "nn.ReLU()" in run.file("export/predict.py").read_text()
    files = odd_images(tmp_path / "images")[:2]
    app = predict.predict_files(predict.from_run(run), files)
    _predicted, probs = script_probs(run.file("export/predict.py"), files, in_process=True)
    np.testing.assert_allclose(probs, app[[f"p_{c}" for c in run.classes]].to_numpy(), atol=2e-6)


# ---------------------------------------------------------------- page and CLI

def test_evaluate_page_shows_the_green_line_and_holds_back_a_flagged_export(trained, lab_home):
    shutil.copytree(trained.path, paths.runs_dir() / trained.id)
    run = get_run(trained.id)
    n = len(run.read_json("splits.json")["test"])
    at = opened("pages/4_Evaluate.py")
    at.button(key="export").click().run()
    assert_ok(at)
    assert any(f"agrees on 100% of {n} test images" in s.value for s in at.success), [s.value for s in at.success]
    assert {"model.safetensors", "model.json", "predict.py"} <= {b.label for b in at.get("download_button")}
    perturb(run.file("export/model.safetensors"))
    at.run()                                          # the page notices and checks again
    assert_ok(at)
    assert any("flagged" in w.value for w in at.warning), [w.value for w in at.warning]
    assert "model.safetensors" not in {b.label for b in at.get("download_button")}
    at.checkbox(key="export_anyway_safetensors").check().run()
    assert "model.safetensors" in {b.label for b in at.get("download_button")}


def test_cli_export_prints_the_check(trained, lab_home, capsys):
    from core import cli
    shutil.copytree(trained.path, paths.runs_dir() / trained.id)
    assert cli.main(["export", trained.id]) == 0
    out = capsys.readouterr().out
    assert "ok: agrees on 100% of" in out and "predict.py" in out
    perturb(paths.runs_dir() / trained.id / "export" / "model.safetensors")
    # re-exporting writes a good file again
    assert cli.main(["export", trained.id]) == 0

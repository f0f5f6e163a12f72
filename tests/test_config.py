"""core.config: the typed run configuration and the rules between settings (issue 15)."""
from __future__ import annotations

import pytest

from core.config import RunConfig
from core.training import sweeps
from core.config import RunConfig, validate_config
from core.serve.store import Run


def test_scratch_is_recorded_as_random_init(tmp_path):
    cfg = validate_config(dict(data_root="x", freeze="scratch", weights="auto", weights_file="w.pth"))
    assert (cfg.weights, cfg.weights_file) == ("random", None)
    run = Run.create(RunConfig(data_root="x", arch="test_resnet", freeze="scratch"), root=tmp_path)
    assert run.config.weights == "random"


def test_a_freeze_sweep_from_a_scratch_base_uses_pretrained_weights():
    """Report 002's preset trains from scratch; sweeping its freeze mode must not give a head-only
    run on a random backbone."""
    base = RunConfig(data_root="x", arch="test_resnet", freeze="scratch", weights="random")
    runs = {cfg.freeze: cfg for cfg in sweeps.expand(base, {"freeze": ["head", "full", "scratch"]})}
    assert runs["head"].weights == runs["full"].weights == "auto"
    assert runs["scratch"].weights == "random"


def test_the_config_module_is_the_single_source_of_ranges_and_choices():
    from core import config
    assert RunConfig is config.RunConfig
    assert "lr" in config.RANGES and "optimizer" in config.CHOICES
    assert validate_config({"scheduler": "none"}).scheduler == "none"


@pytest.mark.slow
def test_an_augmentation_preview_meanwhile_leaves_a_runs_metrics_alone(tiny_config):
    """Issue 15: the preview on Train used to seed torch's global generator, which a background
    run's augmentations and dropout share: same seed, different metrics while it was open."""
    import threading

    import core
    from core.data import folders
    from core.data import images as imaging
    from core.data import transforms
    cfg = tiny_config(freeze="full", epochs=2, dropout=0.3, augment={"hflip": True, "rotation": 30.0},
                      cache_features=False)
    quiet = core.train(cfg).epochs()
    scan = folders.scan_folder(cfg.data_root)
    images, _ = imaging.decode_images(scan.root, scan.items[:2], 32)
    stop, previews = threading.Event(), []

    def preview():
        while not stop.is_set():
            previews.append(transforms.preview_augmentations(images, 32, {"rotation": 90.0}, seed=len(previews)))
    thread = threading.Thread(target=preview)
    thread.start()
    try:
        busy = core.train(cfg).epochs()
    finally:
        stop.set()
        thread.join()
    assert len(previews) > 5
    keys = ("train_loss", "train_acc", "val_loss", "val_acc")
    assert [[row[k] for k in keys] for row in busy] == [[row[k] for k in keys] for row in quiet]

"""Shared fixtures for Finetune Lab's tests (unit, AppTest and browser tests alike).

Fixtures, one line each:
    lab_home       (autouse) FINETUNE_LAB_HOME is a fresh temp folder and the Hugging Face hub is offline.
    image_folder   factory: image_folder(...) -> Path of a generated class-folder data set of small images.
    tiny_config    factory: tiny_config(**overrides) -> RunConfig for a tiny timm model that trains in seconds.

Helpers (plain functions, importable as `from conftest import ...`):
    class_image(label, index, size) -> a PIL image whose colour and stripes identify its class.
    class_folders(root, classes, per_class, size) -> root, with a folder of class_image()s per class.
    tiny_run_config(data_root, **overrides) -> the RunConfig tiny_config() makes, on data_root.
    train_apart(cfg, base) -> a finished Run trained in the foreground below `base`, with its own
                 lab home (for module-scoped fixtures, which must not touch a test's home).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Before anything imports huggingface_hub (it reads this once, at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
# Most tests are the one local user (local mode, what ./lab.sh starts); the class-server tests
# (test_shared_server, test_browser_identity) switch it off and sign people in.
os.environ.setdefault("FINETUNE_LAB_LOCAL", "1")
# Tests compare numbers to 1e-5 across code paths: run them in fp32 even on CPUs where the app
# would pick bf16 autocast (bench/ measures that).
os.environ.setdefault("FINETUNE_LAB_CPU_BF16", "0")

# One distinct colour per class; stripes (direction alternates per class) add a shape cue.
CLASS_COLOURS = [(220, 40, 40), (40, 170, 60), (40, 70, 220), (230, 200, 30),
                 (150, 50, 200), (30, 200, 200), (240, 130, 30), (120, 120, 120)]


def class_image(label: int, index: int = 0, size: int | tuple[int, int] = 40) -> Image.Image:
    """An RGB image that a tiny model can tell apart by class: the class colour, stripes whose
    direction and period depend on the class, and a little per-image noise."""
    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(1000 * label + index)
    colour = np.array(CLASS_COLOURS[label % len(CLASS_COLOURS)], dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    period = 4 + 2 * (label % 3)
    stripes = ((xx if label % 2 else yy) // period) % 2
    img = colour * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


TINY_SETTINGS = dict(arch="test_resnet", weights="random", image_size=32, epochs=2, batch_size=8,
                     lr=1e-2, device="cpu", seed=0)


def class_folders(root: Path, classes: int | list[str] = 3, per_class: int = 12, size: int = 40) -> Path:
    names = [f"class_{chr(97 + i)}" for i in range(classes)] if isinstance(classes, int) else classes
    for label, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            class_image(label, i, size).save(folder / f"img_{i:03d}.png")
    return root


def tiny_run_config(data_root, **overrides):
    from core.config import RunConfig
    return RunConfig(**{**TINY_SETTINGS, "data_root": str(data_root), **overrides})


def train_apart(cfg, base: Path):
    import core
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_LAB_HOME", str(base / "home"))
        run = core.train(cfg, root=base / "runs")
    assert run.status()["state"] == "finished", run.status()
    return run


@pytest.fixture(autouse=True, scope="session")
def full_error_details():
    """The shipped config hides tracebacks from browsers; tests want them in assert messages."""
    from streamlit import config
    config.get_option("client.showErrorDetails")        # parse config.toml first, then override
    config.set_option("client.showErrorDetails", "full")
    yield


@pytest.fixture(autouse=True)
def lab_home(tmp_path, monkeypatch) -> Path:
    """FINETUNE_LAB_HOME -> a fresh folder below tmp_path (so runs/ and datasets/ are private) and HF_HUB_OFFLINE=1."""
    home = tmp_path / "lab_home"
    monkeypatch.setenv("FINETUNE_LAB_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(autouse=True)
def no_stray_dispatcher():
    """A test that starts a dispatcher of its own (RunManager(...), Executor(...)) closes it: a
    dispatcher reads FINETUNE_LAB_HOME on every tick, so it would follow into the next test and
    take its runs, as a second server would, and that test would fail for no reason of its own
    (which one depends on the order, so on the xdist worker). Only the lab's MANAGER may stay."""
    yield
    if "core.serve.worker" not in sys.modules:
        return
    import threading
    import time

    from core.serve.worker import MANAGER
    executor = MANAGER._executor
    lab = executor._thread if executor is not None else None
    end = time.monotonic() + 15          # a closed one ends after its current tick
    while strays := [t for t in threading.enumerate()
                     if t.name == "finetune-lab-dispatcher" and t is not lab and t.is_alive()]:
        if time.monotonic() > end:
            for thread in strays:        # closed here, so only the test that left it fails
                if (owner := getattr(getattr(thread, "_target", None), "__self__", None)) is not None:
                    owner.close()
            pytest.fail(f"{len(strays)} dispatcher(s) besides the lab's MANAGER still running: close the "
                        "RunManager/Executor this test started (manager.close(), executor.close())")
        time.sleep(0.1)


@pytest.fixture
def idle_manager(lab_home):
    """The background queue is process-wide: no run of another test may be in it, before or
    after (modules that start runs use it with pytest.mark.usefixtures)."""
    from apptest_helpers import quiet_queue
    yield from quiet_queue(180)


@pytest.fixture
def image_folder(tmp_path):
    """Factory image_folder(classes=3, per_class=12, size=40, fmt="png", splits=None, name="data", wrapper=None) -> data set Path.

    classes:   an int (names class_a, class_b, ...) or a list of class names.
    per_class: images per class: an int, or a dict {class name: count} for uneven classes.
    fmt:       "png", "jpg", or "mixed" (alternating png and jpg).
    splits:    None for plain class folders, or {split folder name: images per class}, e.g.
               {"train": 8, "valid": 2, "test": 2}; the folder names are used as given.
    wrapper:   put everything inside one extra top folder of this name (as zips often are); the
               returned path is still the outer folder.
    """
    made = []

    def make(classes=3, per_class=12, size=40, fmt="png", splits=None, name="data", wrapper=None):
        root = tmp_path / f"{name}{len(made) or ''}"
        made.append(root)
        base = root / wrapper if wrapper else root
        names = [f"class_{chr(97 + i)}" for i in range(classes)] if isinstance(classes, int) else list(classes)
        counts = per_class if isinstance(per_class, dict) else {c: per_class for c in names}
        layout = [(base / split, n) for split, n in splits.items()] if splits else [(base, None)]
        for split_index, (folder, per_split) in enumerate(layout):
            for label, cls in enumerate(names):
                target = folder / cls
                target.mkdir(parents=True, exist_ok=True)
                for i in range(per_split if per_split is not None else counts[cls]):
                    ext = fmt if fmt != "mixed" else ("png" if i % 2 == 0 else "jpg")
                    options = dict(quality=95) if ext == "jpg" else {}
                    class_image(label, 100 * split_index + i, size).save(
                        target / f"img_{i:03d}.{ext}", **options)
        root.mkdir(parents=True, exist_ok=True)
        return root

    return make


@pytest.fixture
def tiny_config(image_folder):
    """Factory tiny_config(**overrides) -> RunConfig: test_resnet, random weights, 32 px, 2 epochs, batch 8, on a new 3x12 image_folder() unless data_root is given."""
    def make(**overrides):
        if "data_root" not in overrides:
            overrides["data_root"] = image_folder()
        return tiny_run_config(**overrides)

    return make


# ---------------------------------------------------------------- speed: markers and workers
# Each test module says how fast it is where the tests are: `pytestmark = pytest.mark.slow` (or
# per test, where a module mixes quick and slow tests); the markers are declared in
# pyproject.toml. `-m "not slow"` is the quick subset. Whatever a module says, a test outside
# `slow` that took longer than QUICK_TEST_S is named at the end of the run, so a new slow test
# can't hide in the quick subset.

QUICK_TEST_S = 10.0
_unmarked_seconds: dict[str, float] = {}

# Under pytest-xdist (./lab.sh test runs 2 workers) the workers share the cores: each process
# computes with its share, set before anything imports torch (FINETUNE_LAB_THREADS is what
# core.device.set_cpu_threads reads; a run's own process still gets its slot's size).
if os.environ.get("PYTEST_XDIST_WORKER"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _share = str(max(1, _cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    for _name in ("FINETUNE_LAB_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, _share)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["FINETUNE_LAB_THREADS"]))


def pytest_runtest_logreport(report):
    """Add up setup, call and teardown of every test outside `slow` (xdist hands the workers'
    reports to this hook in the main process)."""
    if "slow" not in report.keywords:
        _unmarked_seconds[report.nodeid] = _unmarked_seconds.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    slow = sorted(((s, n) for n, s in _unmarked_seconds.items() if s > QUICK_TEST_S), reverse=True)
    if slow:
        terminalreporter.section(f"not marked slow, but took over {QUICK_TEST_S:.0f} s", sep="!", red=True, bold=True)
        for seconds, nodeid in slow:
            terminalreporter.line(f"{seconds:6.1f} s  {nodeid}")
        terminalreporter.line("Mark them @pytest.mark.slow (or the module: pytestmark = pytest.mark.slow), "
                              "or make them faster: `-m \"not slow\"` is the quick subset.")

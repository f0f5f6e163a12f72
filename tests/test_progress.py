"""core.progress: the one progress shape, the one cancel exception, and batched_forward (eval
mode, inference mode, modes put back, cancel between batches, same numbers as a plain forward)."""
from __future__ import annotations

import threading
import types

import numpy as np
import pytest
import timm
import torch

from core import progress as P
from conftest import class_folders


@pytest.fixture
def model():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=3)


def images(n=5, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def modes(model):
    return {name: m.training for name, m in model.named_modules()}


# ---------------------------------------------------------------- the protocol

def test_one_cancel_exception_everywhere():
    from core.serve import tasks
    from core.training.steps import Stopped
    assert tasks.Cancelled is P.Cancelled
    assert issubclass(Stopped, P.Cancelled)          # `except Cancelled` also ends a stopped training


def test_part_maps_a_step_into_its_share_of_the_whole():
    seen = []
    half = P.part(lambda *call: seen.append(call), 0.5, 1.0, "Predicting images")
    half(0, 4, "ignored: the part names itself")
    half(2, 4)                                       # bare counts, as decode_images reports them
    assert seen == [(500, 1000, "Predicting images 0/4"), (750, 1000, "Predicting images 2/4")]
    passthrough = []
    P.part(lambda *call: passthrough.append(call), 0.0, 0.1)(1, 1, "its own words")
    assert passthrough == [(100, 1000, "its own words")]
    P.part(None, 0, 1)(1, 2)                          # no progress wanted: nothing happens
    P.silent(1, 2, "x")


def test_check_cancel():
    stop = threading.Event()
    P.check_cancel(None)
    P.check_cancel(stop)
    stop.set()
    with pytest.raises(P.Cancelled):
        P.check_cancel(stop)


# ---------------------------------------------------------------- batched_forward

def test_batched_forward_matches_a_plain_forward_and_reports_each_batch(model):
    x = images(5)
    with torch.no_grad():
        want = model.eval()(x)
    model.train()
    seen = []
    got = P.batched_forward(model, x, batch_size=2, progress=lambda *call: seen.append(call), message="Embedding")
    assert got.dtype == torch.float32 and got.device.type == "cpu" and not got.requires_grad
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert seen == [(2, 5, "Embedding 2/5"), (4, 5, "Embedding 4/5"), (5, 5, "Embedding 5/5")]


def test_prepare_builds_batches_and_may_skip_a_chunk(model):
    x = images(6)
    with torch.no_grad():
        want = model.eval()(x[[0, 1, 4, 5]])
    # items are indices; the middle chunk has nothing to run (e.g. all unreadable images)
    got = P.batched_forward(model, list(range(6)), 2,
                            prepare=lambda chunk: None if chunk == [2, 3] else x[chunk])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert P.batched_forward(model, [], 4).shape == (0, 0)


def test_the_model_runs_in_eval_mode_and_gets_its_modes_back(model):
    model.train()
    model.bn1.eval()                                 # a frozen batch norm inside a training model
    before = modes(model)
    during = []
    model.register_forward_pre_hook(lambda m, _a: during.append((m.training, torch.is_inference_mode_enabled())))
    P.batched_forward(model, images(3), 2)
    assert during == [(False, True), (False, True)]
    assert modes(model) == before


def test_cancel_stops_between_batches_and_modes_come_back(model):
    model.train()
    before = modes(model)
    stop, seen = threading.Event(), []

    def progress(done, total, message):
        seen.append(done)
        if done >= 4:
            stop.set()                               # Stop pressed during the second batch
    with pytest.raises(P.Cancelled):
        P.batched_forward(model, images(7), 2, progress=progress, cancel=stop)
    assert seen == [2, 4]
    assert modes(model) == before


def test_a_progress_callback_may_cancel_and_errors_restore_modes(model):
    model.train()
    before = modes(model)

    def cap(done, total, message):
        raise P.Cancelled("time cap")
    with pytest.raises(P.Cancelled, match="time cap"):
        P.batched_forward(model, images(4), 2, progress=cap)
    assert modes(model) == before
    with pytest.raises(RuntimeError):                # a wrong input shape fails inside the forward
        P.batched_forward(model, torch.zeros(2, 5, 8, 8), 2)
    assert modes(model) == before


def test_two_dimensional_inputs_keep_their_layout():
    head = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5)).train()
    x = torch.randn(5, 4)
    with torch.no_grad():
        want = head[0](x)                            # dropout off: eval mode
    torch.testing.assert_close(P.batched_forward(head, x, 2), want)
    assert head.training


# ---------------------------------------------------------------- callers of the protocol

def test_embed_items_reports_progress_and_stops(tmp_path, model):
    from core.trust import embeddings
    root = class_folders(tmp_path / "data", ["a", "b"], 3)
    (root / "a" / "broken.png").write_bytes(b"not an image")
    rels = sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))
    model.train()
    seen = []
    vectors = embeddings.embed_items(str(root), rels, model=model, size=32, batch_size=4, device="cpu",
                                     progress=lambda *call: seen.append(call))
    broken = rels.index("a/broken.png")
    assert np.isnan(vectors[broken]).all() and np.isfinite(np.delete(vectors, broken, 0)).all()
    assert seen == [(4, 7, "Embedding images 4/7"), (7, 7, "Embedding images 7/7")]
    assert model.training
    stop = threading.Event()
    stop.set()
    with pytest.raises(P.Cancelled):
        embeddings.embed_items(str(root), rels, model=model, size=32, stop=stop, device="cpu")


def test_predict_probs_is_the_softmax_of_the_forward(model):
    from core.results.evaluate import predict_probs
    raw = [torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8) for _ in range(3)]
    to_float = lambda img: img.float() / 255       # noqa: E731 - a stand-in transform
    with torch.no_grad():
        want = model.eval()(torch.stack([to_float(img) for img in raw])).softmax(-1).numpy()
    seen = []
    got = predict_probs(model, raw, to_float, torch.device("cpu"), batch_size=2,
                        progress=lambda done, total, _m: seen.append((done, total)))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert seen == [(2, 3), (3, 3)]
    assert predict_probs(model, [], to_float, torch.device("cpu")).shape == (0, 0)


def test_a_task_writes_the_fraction_and_stops_on_cancel():
    from core.serve import tasks
    written = []
    task = types.SimpleNamespace(set_status=lambda state, **info: written.append(info))
    stop = threading.Event()
    report = tasks._progress(task, stop)
    report(1, 4, "Embedding images 1/4")
    report(4, 4, "Done")                             # the end is always written
    assert written[0] == dict(message="Embedding images 1/4", fraction=0.25)
    assert written[-1] == dict(message="Done", fraction=1.0)
    stop.set()
    with pytest.raises(P.Cancelled):
        report(2, 4, "more")


def test_the_page_bar_follows_the_protocol_and_goes_away(monkeypatch):
    from pages.common import progress as page_progress
    calls = []

    class Bar:
        def progress(self, value, text=""):
            calls.append((value, text))

        def empty(self):
            calls.append("empty")
    monkeypatch.setattr(page_progress.st, "progress", lambda value, text="": Bar())
    with pytest.raises(P.Cancelled):
        with page_progress.progress_bar("Starting…") as progress:
            progress(1, 4, "Embedding images 1/4")
            progress(3, 4)                           # bare counts keep the bar's own words
            raise P.Cancelled()
    assert calls == [(0.25, "Embedding images 1/4"), (0.75, "Starting…"), "empty"]

"""AppTest helpers shared by the page tests."""
from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

ENTRY = str(Path(__file__).resolve().parents[1] / "streamlit_app.py")


def assert_ok(at: AppTest) -> None:
    assert not at.exception, [(e.value, "\n".join(e.stack_trace)) for e in at.exception]


def opened(page: str | None = None, timeout: float = 120) -> AppTest:
    """The app run once from its entry file (Home), then switched to `page`."""
    at = AppTest.from_file(ENTRY, default_timeout=timeout).run()
    assert_ok(at)
    if page:
        at.switch_page(page).run()
        assert_ok(at)
    return at


def use_small_settings(at: AppTest, data_root, **overrides) -> None:
    """Switch the session's settings to a tiny test_resnet on `data_root` (Train only reads them).
    The Train page picks a device-dependent image size on its first visit; mark that as done so
    the size set here stays."""
    settings = dict(at.session_state["lab"].settings)
    settings.update(data_root=str(data_root), data_label="Test images", arch="test_resnet",
                    weights="random", weights_file=None, freeze="full", image_size=64, epochs=2,
                    batch_size=8, lr=1e-2, optimizer="adamw", scheduler="none", augment={},
                    device="cpu", seed=0)
    settings.update(overrides)
    at.session_state["lab"].settings = settings
    at.session_state["lab"].image_size_chosen = True


def manager_idle(timeout: float) -> bool:
    import time

    from core.serve.worker import MANAGER
    end = time.monotonic() + timeout
    while MANAGER.busy():
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def quiet_queue(timeout: float):
    """Fixture body: no background run from another test may be training before or after."""
    from core.serve.store import ACTIVE_STATES, list_runs
    from core.serve.worker import MANAGER
    assert manager_idle(timeout), "a run from an earlier test is still in the queue"
    yield
    for run in list_runs():
        if run.status().get("state") in ACTIVE_STATES:
            MANAGER.stop(run.id)
    assert manager_idle(timeout), "a run started by this test did not end"


def texts(at: AppTest) -> str:
    """All markdown-ish text on the page (markdown, captions, titles, alerts), one string."""
    parts = []
    for kind in ("markdown", "caption", "title", "subheader", "info", "error", "warning", "success"):
        parts += [str(e.value) for e in getattr(at, kind)]
    return "\n".join(parts)


def errors(at: AppTest) -> str:
    return "\n".join(str(e.value) for e in at.error)


def keys(at: AppTest, kind: str = "button") -> set[str]:
    """The keys of the page's widgets of one kind."""
    return {w.key for w in at.get(kind) if w.key}


def start_button(at: AppTest):
    return next(b for b in at.button if "Start training" in b.label)


def wait_state(run_id: str, states=("finished", "failed", "stopped", "interrupted"), timeout: float = 120) -> dict:
    """Poll a run's status until it is in one of `states`."""
    import time

    from core.serve.store import get_run
    end = time.monotonic() + timeout
    while (status := get_run(run_id).status()).get("state") not in states:
        assert time.monotonic() < end, f"{run_id} still {status.get('state')}: {status.get('message')}"
        time.sleep(0.1)
    return status

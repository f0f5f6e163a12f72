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

    from core.worker import MANAGER
    end = time.monotonic() + timeout
    while MANAGER.busy():
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def quiet_queue(timeout: float):
    """Fixture body: no background run from another test may be training before or after."""
    from core.store import ACTIVE_STATES, list_runs
    from core.worker import MANAGER
    assert manager_idle(timeout), "a run from an earlier test is still in the queue"
    yield
    for run in list_runs():
        if run.status().get("state") in ACTIVE_STATES:
            MANAGER.stop(run.id)
    assert manager_idle(timeout), "a run started by this test did not end"

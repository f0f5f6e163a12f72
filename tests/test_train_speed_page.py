"""The Train page's fast fine-tuning panel: cache and memory sentence, time-budget plan, the
learning-rate test with its chart and Use button, and a budget run's plan in the live view."""
from __future__ import annotations

import time

import pytest

from apptest_helpers import assert_ok, opened, use_small_settings
from core.serve.store import list_runs
from test_pages import button, charts, texts, wait_for_state

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("idle_manager")]   # the queue is process-wide

TRAIN = "pages/3_Train.py"


def train_page(data_root, **settings):
    at = opened()
    use_small_settings(at, data_root, **settings)
    at.switch_page(TRAIN).run()
    assert_ok(at)
    return at


def test_panel_states_the_cache_and_its_memory(image_folder):
    at = train_page(image_folder(classes=3, per_class=12, size=40), freeze="top_k", top_k=1)
    assert "Caches the frozen layers' output" in texts(at)
    assert "MB in memory" in texts(at)
    at.number_input(key="w_aug_views").set_value(3).run()
    assert_ok(at)
    assert at.session_state["lab"].settings["aug_views"] == 3


def test_live_augmentation_says_why_nothing_is_cached(image_folder):
    at = train_page(image_folder(classes=3, per_class=12, size=40), freeze="top_k", augment={"hflip": True})
    assert "No caching: augmentation runs live" in texts(at)


def test_time_budget_shows_a_plan_before_start(image_folder):
    at = train_page(image_folder(classes=3, per_class=12, size=40), freeze="top_k")
    at.number_input(key="w_budget_min").set_value(2.0).run()
    assert_ok(at)
    assert at.session_state["lab"].settings["time_budget_s"] == 120
    assert "Plan for 2 minutes" in texts(at)
    plan = [t.value for t in at.table if "trains" in t.value.columns]
    assert plan and list(plan[0].index)[0] == "head"


def test_learning_rate_test_draws_a_chart_and_applies_only_on_click(image_folder):
    at = train_page(image_folder(classes=3, per_class=12, size=40), freeze="full", lr=1e-2)
    before = len(charts(at))
    button(at, "Suggest a learning rate").click().run()
    assert_ok(at)
    task_id, _ = at.session_state["lab"].page["lr_task"]        # a task in a worker process
    from core.serve import tasks
    end = time.monotonic() + 180
    while tasks.get_task(task_id).status().get("state") in ("queued", "preparing", "running"):
        assert time.monotonic() < end, tasks.get_task(task_id).status()
        time.sleep(0.2)
    at.run()
    assert_ok(at)
    assert len(charts(at)) == before + 1, tasks.get_task(task_id).status()
    assert at.session_state["lab"].settings["lr"] == 1e-2          # nothing applied yet
    use = button(at, "Use ")
    suggested = float(use.label.split()[-1])
    use.click().run()
    assert_ok(at)
    assert at.session_state["lab"].settings["lr"] == suggested
    assert at.number_input(key="w_lr").value == suggested


def test_budget_run_from_the_page_shows_its_plan_and_precision(image_folder):
    at = train_page(image_folder(classes=3, per_class=12, size=40), freeze="top_k")
    at.number_input(key="w_budget_min").set_value(1.0).run()
    button(at, "Start training").click().run()
    assert_ok(at)
    assert list_runs()[0].config.time_budget_s == 60
    status = wait_for_state(at, ("finished", "failed", "stopped", "interrupted"), timeout=120)
    assert status["state"] == "finished", status.get("message")
    at.run()
    assert_ok(at)
    assert "precision" in texts(at)
    assert any("Plan for a 1-minute budget" in e.label for e in at.expander)

"""core.results.report: the self-contained HTML report of a run and of a sweep, and the report buttons
on the Evaluate and Experiments pages (AppTest).

One tiny run (test_resnet, 32 px, 2 epochs) is trained once per module on generated images whose
class names need care: '<b>cat&dog' must be escaped, and 'price $5 & $6' holds a pair of dollars
that matplotlib would read as mathtext. Runs are trained outside any test's lab home and copied
in where a page needs them.
"""
from __future__ import annotations

import base64
import io
import re
import shutil

import pytest
from PIL import Image

from apptest_helpers import opened

import core
from conftest import class_folders as make_data
from conftest import tiny_run_config as tiny
from conftest import train_apart as train
from core import paths
from core.results import evaluate as evaluation, inspection
from core.results import report as reports
from core.training import sweeps
from core.serve.store import Run, get_run

pytestmark = pytest.mark.slow

CLASSES = ["<b>cat&dog", "plain", "price $5 & $6"]
IMG_SRC = re.compile(r'<img\b[^>]*?\bsrc="([^"]*)"')
THUMB_SRC = re.compile(r'<figure class="thumb[^"]*"><img src="([^"]*)"')


def decoded(src: str) -> Image.Image:
    """The image a data: URI holds; fails unless it is base64 that PIL can fully decode."""
    header, payload = src.split(",", 1)
    assert header.startswith("data:image/") and header.endswith(";base64"), header[:40]
    img = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    img.load()
    return img


def assert_self_contained(html: str) -> None:
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I)
    assert "<script" not in html.lower() and "@import" not in html and "url(" not in html
    assert all(href.startswith("#") for href in re.findall(r'href="([^"]*)"', html))
    srcs = IMG_SRC.findall(html)
    assert len(srcs) == html.count("<img ") > 0
    for src in srcs:
        assert decoded(src).size[0] > 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Run:
    base = tmp_path_factory.mktemp("report_run")
    return train(tiny(make_data(base / "data", CLASSES)), base)


@pytest.fixture(scope="module")
def report(trained) -> str:
    return reports.run_report(trained)


@pytest.fixture
def copied(trained, tmp_path) -> Run:
    """A private copy of the trained run, free to modify."""
    shutil.copytree(trained.path, tmp_path / trained.id)
    return Run(tmp_path / trained.id)


# ---------------------------------------------------------------- run report

def test_run_report_has_every_section(report):
    assert report.startswith("<!doctype html>")
    for sid, title in reports.RUN_SECTIONS.items():
        assert f'<section id="{sid}">\n<h2>{title}</h2>' in report, sid
        assert f'<a href="#{sid}">' in report, sid
    for part in ("Feature maps", "First-layer filters", "Activation sparsity", "Samples",
                 "most confident", "least confident", "misclassified"):
        assert part in report, part
    assert "Could not look inside" not in report and "No stored" not in report


def test_run_report_is_self_contained(report):
    assert_self_contained(report)
    assert "Content-Security-Policy" in report
    assert len(IMG_SRC.findall(report)) > 30     # charts, samples, galleries, feature maps


def test_run_report_thumbnails_are_small(report):
    thumbs = THUMB_SRC.findall(report)
    assert len(thumbs) > 20
    assert all(max(decoded(src).size) <= reports.THUMB for src in thumbs)


def test_run_report_escapes_user_text(report):
    assert "<b>cat&dog" not in report
    assert "&lt;b&gt;cat&amp;dog" in report
    assert "price $5 &amp; $6" in report       # and its charts rendered: '$' reached matplotlib escaped


def test_run_report_tables_match_the_run(trained, report):
    metrics = trained.read_json("test_metrics.json")
    assert f"<b>{metrics['accuracy']:.1%}</b>" in report
    epochs = re.search(r'<section id="epochs">.*?</section>', report, re.S).group(0)
    assert epochs.count("<tr") == 1 + len(trained.epochs())
    wrong = sum(sum(row) - row[i] for i, row in enumerate(metrics["confusion"]))
    assert f"<p>{wrong} of {metrics['n']} images misclassified" in report


def test_save_run_report_writes_into_the_run_folder(copied):
    path = reports.save_run_report(copied, include_inspection=False)
    assert path == copied.file("report.html")
    html = path.read_text(encoding="utf-8")
    assert html.startswith("<!doctype html>") and "Left out of this report." in html
    assert not list(copied.path.glob(".*.tmp"))
    assert reports.save_run_report(copied, "val", include_inspection=False) == copied.file("report-val.html")


def test_inspection_failure_leaves_a_note(copied, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("no intermediates")

    monkeypatch.setattr(inspection, "feature_maps", broken)
    html = reports.run_report(copied)
    assert "Could not look inside this network: RuntimeError: no intermediates" in html
    assert all(f'<section id="{sid}">' in html for sid in reports.RUN_SECTIONS)


def test_report_of_moved_data_shows_placeholders(copied):
    """The data set is gone: thumbnails become grey tiles, never broken images."""
    splits = copied.read_json("splits.json")
    copied.write_json("splits.json", dict(splits, root=str(copied.path / "gone")))
    html = reports.run_report(copied)
    assert_self_contained(html)
    assert "can be read any more" in html          # the inspection's note
    grey = [decoded(src).convert("RGB").getpixel((0, 0)) for src in THUMB_SRC.findall(html)]
    assert grey and all(max(abs(v - 200) for v in px) <= 3 for px in grey)   # JPEG: about 200
    assert "The data set changed since this run trained" in html and "images removed" in html


def test_report_names_the_data_and_says_nothing_changed(report):
    assert "(data: files " in report and "changed since this run trained" not in report


def test_report_without_predictions_or_checkpoint(copied):
    for name in ("test_predictions.csv", "test_metrics.json", "best.safetensors"):
        copied.file(name).unlink()
    html = reports.run_report(copied)
    assert html.count("No stored test predictions") == 4     # metrics, confusion, ranked, misclassified
    assert "No network checkpoint" in html
    assert_self_contained(html)


def test_logreg_baseline_report(tmp_path_factory):
    """No network (no checkpoint, NaN training loss): every section still renders."""
    base = tmp_path_factory.mktemp("report_logreg")
    run = train(tiny(make_data(base / "data", ["a", "b"]), baseline="logreg"), base)
    html = reports.run_report(run)
    assert all(f'<section id="{sid}">' in html for sid in reports.RUN_SECTIONS)
    assert "No network checkpoint" in html and "logistic regression" in html
    assert_self_contained(html)


def test_demo_sized_report_stays_small(tmp_path_factory):
    """The built-in demo set (10 classes x 100 images) at 128 px: thumbnails, not originals."""
    base = tmp_path_factory.mktemp("report_demo")
    run = train(tiny(core.demo_dataset(), image_size=128, epochs=1, batch_size=32), base)
    path = reports.save_run_report(run)
    size = path.stat().st_size
    print(f"demo-sized report: {size / 1e6:.2f} MB")
    assert size < 3_000_000
    html = path.read_text(encoding="utf-8")
    assert "Could not look inside" not in html
    assert_self_contained(html)



# ---------------------------------------------------------------- escaping and the template

HOSTILE = "<script>alert(1)</script>\"&'"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;&#34;&amp;&#39;"     # as Jinja2 autoescape writes it


def rename_class(run: Run, old: str, new: str) -> None:
    """Rename a class in a finished run's stored files (a folder name cannot hold '/')."""
    run.write_json("classes.json", [new if c == old else c for c in run.classes])
    metrics = run.read_json("test_metrics.json")
    metrics["classes"] = [new if c == old else c for c in metrics["classes"]]
    for row in metrics["per_class"]:
        row["cls"] = new if row["cls"] == old else row["cls"]
    run.write_json("test_metrics.json", metrics)
    frame = evaluation.load_predictions(run).replace({"true": {old: new}, "predicted": {old: new}})
    frame.rename(columns={f"p_{old}": f"p_{new}"}).to_csv(run.file("test_predictions.csv"), index=False)


def test_hostile_class_run_name_and_message_are_escaped(copied):
    """A class, a run name, a status message and a file name holding markup and quotes show as
    text in every section of both reports: no raw <script> from data anywhere."""
    rename_class(copied, "plain", HOSTILE)
    copied.write_json("config.json", dict(copied.read_json("config.json"), name=HOSTILE))
    copied.write_json("status.json", dict(copied.read_json("status.json"), message=HOSTILE))
    copied.write_json("skipped.json", [[f"bad{HOSTILE}.png", HOSTILE]])
    html = reports.run_report(copied)
    assert_self_contained(html)                        # no <script at all
    assert HOSTILE not in html and "alert(1)</script>" not in html
    for shown in (f'<p class="meta">{ESCAPED} · finished</p>',      # subtitle: the run's name
                  f"<p>Status: {ESCAPED}</p>", f"<td>bad{ESCAPED}.png</td><td>{ESCAPED}</td>",
                  f"<td>{ESCAPED}</td>",                                # data, metrics, config tables
                  f"<th>{ESCAPED}</th>", f"<td><b>{ESCAPED}</b></td>",  # confusion matrix
                  f"<h3>{ESCAPED}</h3>", f"<figcaption>{ESCAPED}</figcaption>",  # ranked, samples
                  f"true: {ESCAPED}"):                                  # misclassified captions
        assert shown in html, shown
    assert all(f'<section id="{sid}">' in html for sid in reports.RUN_SECTIONS)

    sweep = reports.sweep_report(HOSTILE, [copied])
    assert_self_contained(sweep)
    assert HOSTILE not in sweep
    for shown in (f"<title>Sweep {ESCAPED}</title>", f'<article id="run-0"><h3>{ESCAPED}</h3>',
                  f"</code> · {ESCAPED}</p>", f"<td>{ESCAPED}</td>"):
        assert shown in sweep, shown


def test_reports_render_the_shipped_template(tmp_path, monkeypatch):
    env = reports._env()
    assert env.autoescape is True
    page = env.get_template(reports.TEMPLATE)
    assert page.filename == str(paths.ASSETS / "templates" / "report.html.j2")
    # an edited copy of the templates changes the report: the page comes from that file, not code
    shutil.copytree(reports.TEMPLATES, tmp_path / "templates")
    edited = tmp_path / "templates" / reports.TEMPLATE
    edited.write_text(edited.read_text(encoding="utf-8").replace("Finetune Lab report", "Edited"),
                      encoding="utf-8")
    monkeypatch.setattr(reports, "TEMPLATES", tmp_path / "templates")
    reports._env.cache_clear()
    try:
        html = reports.sweep_report("none", [])
    finally:
        reports._env.cache_clear()        # the next report loads the shipped templates again
    assert "<footer>Edited · generated" in html and "Finetune Lab report" not in html
    assert '<section id="summary">\n<h2>Summary</h2>\n<p class="note">This sweep has no runs.</p>' in html


# ---------------------------------------------------------------- sweep report

@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory) -> list[Run]:
    """A two-run learning-rate sweep of tiny runs, in a private lab home."""
    base = tmp_path_factory.mktemp("report_sweep")
    data = make_data(base / "data", CLASSES)
    configs = sweeps.expand(tiny(data, epochs=1), {"lr": [0.01, 0.001]})
    return [train(cfg, base) for cfg in configs]


def test_sweep_report(sweep_runs):
    sweep = sweep_runs[0].config.sweep
    html = reports.sweep_report(sweep, sweep_runs)
    for sid, title in reports.SWEEP_SECTIONS.items():
        assert f'<section id="{sid}">\n<h2>{title}</h2>' in html, sid
    assert '<article id="run-0">' in html and '<article id="run-1">' in html
    assert "lr=0.01" in html and "lr=0.001" in html
    assert "Varied: <b>lr</b>" in html
    assert_self_contained(html)


def test_sweep_report_finds_the_sweeps_runs(sweep_runs):
    for run in sweep_runs:
        shutil.copytree(run.path, paths.runs_dir() / run.id)
    sweep = sweep_runs[0].config.sweep
    path = reports.save_sweep_report(sweep)
    assert path.parent == paths.home() / "reports"
    html = path.read_text(encoding="utf-8")
    assert all(run.id in html for run in sweep_runs)


# ---------------------------------------------------------------- pages

def test_evaluate_page_builds_a_report(trained):
    shutil.copytree(trained.path, paths.runs_dir() / trained.id)
    run = get_run(trained.id)
    at = opened("pages/4_Evaluate.py")
    assert "report.html" not in {b.label for b in at.get("download_button")}
    at.button(key="build_report").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "report.html" in {b.label for b in at.get("download_button")}
    assert any("opens offline" in c.value.lower() for c in at.caption)
    assert run.file("report.html").exists()
    assert "&lt;b&gt;cat&amp;dog" in run.file("report.html").read_text(encoding="utf-8")


def test_experiments_page_builds_a_sweep_report(sweep_runs):
    for run in sweep_runs:
        shutil.copytree(run.path, paths.runs_dir() / run.id)
    at = opened("pages/7_Experiments.py")
    at.button(key="build_sweep_report").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "report.html" in {b.label for b in at.get("download_button")}
    sweep = sweep_runs[0].config.sweep
    assert (paths.home() / "reports" / f"sweep-{sweep}.html").exists()

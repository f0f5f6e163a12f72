"""Pages are views: options, ranges and widget state come from one place each. These tests read
the page sources, so a page that restates a setting's option list or range, or reaches into
st.session_state, fails here rather than drifting from core/config.py."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from core.config import CHOICES, RANGES, WIDGET_CHOICES

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "pages").glob("[0-9]_*.py"))
VIEWS = PAGES + sorted((ROOT / "pages" / "common").glob("*.py"))
SETTING_VALUES = [set(map(str, v)) for v in (*CHOICES.values(), *WIDGET_CHOICES.values())]


def literal_values(node) -> set[str] | None:
    if isinstance(node, (ast.List, ast.Tuple)) and node.elts and all(isinstance(e, ast.Constant) for e in node.elts):
        return {str(e.value) for e in node.elts}
    return None


def restated_options(path: Path) -> list[str]:
    """Literal lists of two or more values that all belong to one setting's choices."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        values = literal_values(node)
        if values and len(values) >= 2 and any(values <= allowed for allowed in SETTING_VALUES):
            found.append(f"{path.name}:{node.lineno} {sorted(values)}")
    return found


def restated_ranges(path: Path) -> list[str]:
    """min_value/max_value given as a number that is a setting's range bound."""
    bounds = {b for pair in RANGES.values() for b in pair}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.keyword) and node.arg in ("min_value", "max_value") \
                and isinstance(node.value, ast.Constant) and node.value.value in bounds - {0, 1}:
            found.append(f"{path.name}:{node.value.lineno} {node.arg}={node.value.value}")
    return found


@pytest.mark.parametrize("path", VIEWS, ids=lambda p: p.name)
def test_no_page_restates_a_settings_options_or_range(path):
    assert restated_options(path) + restated_ranges(path) == []


@pytest.mark.parametrize("path", VIEWS, ids=lambda p: p.name)
def test_only_the_state_module_touches_session_state(path):
    if path.name == "state.py":
        pytest.skip("the one module that may")
    lines = [f"{path.name}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
             if "session_state" in line and not line.lstrip().startswith("#")]
    assert lines == []


def test_the_check_catches_a_restated_list(tmp_path):
    page = tmp_path / "9_Bad.py"
    page.write_text('import streamlit as st\nst.selectbox("Optimizer", ["sgd", "adam"])\n'
                    'st.number_input("Epochs", min_value=1, max_value=500)\n')
    assert restated_options(page) and restated_ranges(page)


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_every_page_is_a_view_with_a_main(path):
    """A page is named functions and one call of main(): no logic at module level."""
    tree = ast.parse(path.read_text())
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "main" in names
    loose = [n.lineno for n in tree.body
             if not isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef))
             and not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))     # docstring
             and not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
                      and getattr(n.value.func, "id", None) == "main")
             and not (isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper()
                                                        for t in n.targets))]       # constants
    assert loose == [], f"statements at module level on lines {loose}"

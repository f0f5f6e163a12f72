"""Tables handed to people as CSV: a cell that starts with = + - @ (or a tab or carriage return)
would run as a formula in a spreadsheet, so it gets a leading apostrophe (OWASP's advice).
Numbers stay numbers; the app's own files keep the raw text."""
from __future__ import annotations

import pandas as pd

RISKY = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value):
    return "'" + value if isinstance(value, str) and value.startswith(RISKY) else value


def csv_safe(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    for column in out.columns:
        if not pd.api.types.is_numeric_dtype(out[column]):
            out[column] = out[column].map(safe_cell)
    out.columns = [safe_cell(str(c)) for c in out.columns]
    return out


def to_csv(frame: pd.DataFrame) -> str:
    return csv_safe(frame).to_csv(index=False)

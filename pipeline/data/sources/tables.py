"""Read the tables that carry captions (metadata.jsonl/.csv, manifests) as rows of text."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline.data.sources import SourceError

TABLE_SUFFIXES = (".csv", ".parquet", ".jsonl")


def read_rows(path: Path) -> list[dict]:
    """Every row of a CSV, Parquet or JSONL file as a dict; a malformed file names itself and the line."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".csv":
        # Everything as text, and "NA" or "null" stay captions: only an empty cell is a missing caption.
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    elif suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        raise SourceError(f"{path}: unsupported table format {suffix!r} (use one of {', '.join(TABLE_SUFFIXES)})")
    return frame.to_dict(orient="records")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{path}: line {number} is not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise SourceError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def require_column(rows: list[dict], column: str, path: Path, key: str) -> None:
    """Fail naming the file, the column and the params key that chose it when no row has the column.

    A single row without it is the caller's to judge (a missing caption is an unconditional sample).
    """
    if rows and not any(column in row for row in rows):
        present = sorted({name for row in rows for name in row})
        raise SourceError(f"{path}: no column {column!r} (set by {key}); columns present: {present}")

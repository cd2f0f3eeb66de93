"""A user's JSONL or parquet file of ``question``/``answer`` rows (optional level/source/complexity)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import UserError

REQUIRED = ("question", "answer")


def _integers(column: pd.Series) -> bool:
    numbers = pd.to_numeric(column, errors="coerce")
    return bool(numbers.notna().all() and (numbers % 1 == 0).all())


def load_user_dataset(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=True, dtype=False)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read dataset '{path}' ({type(err).__name__}): give a JSONL or parquet file") from err
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise UserError(f"dataset '{path}' lacks column(s) {', '.join(missing)}: each row needs question and answer")
    if frame.empty:
        raise UserError(f"dataset '{path}' is empty: add rows with question and answer")
    if "level" in frame and not _integers(frame["level"]):
        raise UserError(f"dataset '{path}': column 'level' must hold integers (e.g. 0, 1, 2), got "
                        f"{frame['level'].tolist()[:3]}...: fix the column or drop it")
    name = path.stem
    frame = frame.assign(
        prompt_id=range(len(frame)),
        level=frame["level"].astype(int) if "level" in frame else 0,
        source=frame["source"].astype(str) if "source" in frame else name,
        complexity=frame["complexity"].astype(float) if "complexity" in frame else 0.0,
        answer=frame["answer"].astype(str),
        task_name=name,
    )
    return frame.to_dict("records")

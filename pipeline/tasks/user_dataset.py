"""A user's JSONL or parquet dataset, in TRL's layout or ours, with every column kept.

TRL's layout: ``prompt``, as text or as a list of chat messages ({"role", "content"}), plus the
columns its reward functions read (``solution``, ...). Ours: ``question`` and ``answer``. Every
column reaches the reward functions unchanged. Two are added when missing: ``question`` (the
prompt's text, for the hybrid reward model) and ``answer`` (copied from ``solution``: the gold
answer of ``correct``, the held-out evaluation and the dump). Optional ``level``, ``source`` and
``complexity`` columns feed the curriculum samplers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import UserError
from pipeline.prompting import as_text

PROMPT_COLUMNS = ("prompt", "question")
ANSWER_COLUMNS = ("answer", "solution")


def _plain(value: Any) -> Any:
    """Parquet's arrays of message structs -> TRL's lists of dicts."""
    if isinstance(value, np.ndarray):
        return [dict(v) if isinstance(v, dict) else _plain(v) for v in value]
    return value


def _question(prompt: Any) -> str:
    """The last user turn of chat messages, or the text prompt itself."""
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if m.get("role") == "user"] or prompt
    return as_text(users[-1:])


def _integers(column: pd.Series) -> bool:
    numbers = pd.to_numeric(column, errors="coerce")
    return bool(numbers.notna().all() and (numbers % 1 == 0).all())


def load_user_dataset(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=True, dtype=False)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read dataset '{path}' ({type(err).__name__}): give a JSONL or parquet file") from err
    if not any(c in frame.columns for c in PROMPT_COLUMNS):
        raise UserError(f"dataset '{path}' has no prompt column: give each row a `prompt` (text or chat messages, "
                        f"TRL's layout) or a `question` (it has {', '.join(map(str, frame.columns))})")
    if frame.empty:
        raise UserError(f"dataset '{path}' is empty: add rows with a prompt")
    if "level" in frame and not _integers(frame["level"]):
        raise UserError(f"dataset '{path}': column 'level' must hold integers (e.g. 0, 1, 2), got "
                        f"{frame['level'].tolist()[:3]}...: fix the column or drop it")
    name = path.stem
    frame = frame.assign(
        prompt_id=range(len(frame)),
        level=frame["level"].astype(int) if "level" in frame else 0,
        source=frame["source"].astype(str) if "source" in frame else name,
        complexity=frame["complexity"].astype(float) if "complexity" in frame else 0.0,
        task_name=name,
    )
    rows = [{key: _plain(value) for key, value in row.items()} for row in frame.to_dict("records")]
    answer = next((c for c in ANSWER_COLUMNS if c in frame.columns), None)
    for row in rows:
        if "question" not in row:
            row["question"] = _question(row["prompt"])
        if answer is not None:
            row["answer"] = str(row[answer])
    return rows

"""The stage-1 dump: parquet schema, key-value metadata, reading a file or a directory of parts.

Layout: ``rollout_dump/<task>/<model>/rollouts_<tag>/part-<chunk>.parquet`` plus
``rollouts_metadata.json`` in the same directory. Stage 2 reads it through ``read_dump``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import atomic_write
from pipeline.errors import UserError

SCHEMA_VERSION = "2"
# what each version's completions hold; stage 2 reads every version listed here
SCHEMA_VERSIONS = {
    "1": "completions without their stop token",
    "2": "completions end with their stop token when finish_reason is 'stop', as TRL's do",
}
META_PREFIX = "rvg."

BASE_FIELDS = [
    ("prompt_id", pa.int64()),
    ("prompt_text", pa.string()),
    ("prompt_token_ids", pa.list_(pa.int32())),
    ("task_name", pa.string()),
    ("level", pa.int16()),
    ("answer", pa.string()),
    ("group_id", pa.int64()),
    ("completion_id", pa.int16()),
    ("pair_id", pa.int16()),
    ("sister", pa.int8()),
    ("split_token_idx", pa.int32()),
    ("degenerate", pa.bool_()),
    ("completion_token_ids", pa.list_(pa.int32())),
    ("completion_text", pa.string()),
    ("num_completion_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("reward", pa.float64()),
    ("reward_group_mean", pa.float64()),
    ("reward_group_var", pa.float64()),
]
REQUIRED_COLUMNS = [name for name, _ in BASE_FIELDS]


def schema_for(reward_names: list[str], kv: dict[str, Any]) -> pa.Schema:
    fields = list(BASE_FIELDS)
    for name in reward_names:
        fields += [(f"reward_{name}", pa.float64()), (f"reward_{name}_group_mean", pa.float64()),
                   (f"reward_{name}_group_var", pa.float64())]
    metadata = {f"{META_PREFIX}{k}": json.dumps(v) for k, v in kv.items()}
    metadata[f"{META_PREFIX}schema_version"] = json.dumps(SCHEMA_VERSION)
    return pa.schema(fields, metadata=metadata)


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """Vocabulary size + hash of the token->id map: two tokenizers with equal fingerprints tokenise alike."""
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]
    return {"vocab_size": len(vocab), "vocab_sha256": digest}


def write_part(path: Path, table: pa.Table) -> Path:
    """One chunk of the dump, atomically: a killed run leaves whole parts only."""
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _unreadable(file: Path, err: Exception) -> UserError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"'{file}' is not a readable parquet file ({reason}): delete it and rerun stage 1 to "
                     "regenerate it, or point --rollouts at a stage-1 dump")


def readable_part(file: Path) -> Path:
    """``file`` if its parquet footer reads (a truncated or non-parquet file fails here, named)."""
    try:
        pq.read_schema(file)
    except (pa.ArrowException, OSError) as err:
        raise _unreadable(file, err) from err
    return file


def dump_files(path: str | Path) -> list[Path]:
    """The dump's part files, each checked readable."""
    path = Path(path)
    if path.is_file():
        return [readable_part(path)]
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if files:
            return [readable_part(f) for f in files]
        raise UserError(f"'{path}' holds no .parquet files: point --rollouts at a stage-1 dump")
    raise UserError(f"rollouts '{path}' not found: run generate_paired_rollouts.py first or fix the path")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The key-value metadata (model name, reward names, tokenizer fingerprint, ...) of a dump."""
    file = dump_files(path)[0]
    raw = pq.read_schema(file).metadata or {}
    try:
        return {k.decode()[len(META_PREFIX):]: json.loads(v) for k, v in raw.items()
                if k.decode().startswith(META_PREFIX)}
    except ValueError as err:
        raise UserError(f"'{file}' has corrupt {META_PREFIX}* metadata: regenerate the dump with stage 1") from err


def schema_version(path: str | Path, metadata: dict[str, Any]) -> str:
    """The dump's schema version, described in one phrase; a version this code does not know is refused."""
    version = str(metadata.get("schema_version", "1"))
    if version not in SCHEMA_VERSIONS:
        raise UserError(f"rollouts '{path}' have schema version {version}, newer than this code reads "
                        f"({', '.join(SCHEMA_VERSIONS)}): update the pipeline")
    return f"schema version {version}: {SCHEMA_VERSIONS[version]}"


def read_dump(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    tables = []
    for file in dump_files(path):
        try:
            tables.append(pq.read_table(file, columns=columns))
        except (pa.ArrowException, KeyError, OSError) as err:
            raise _unreadable(file, err) from err
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowException as err:
        raise UserError(f"the parts of rollouts '{path}' do not share one schema ({err}): regenerate the dump "
                        "with one stage-1 command") from err

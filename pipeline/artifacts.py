"""Paths, atomic writes and run metadata: every artifact appears whole or not at all."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

TRACKED_PACKAGES = ("torch", "transformers", "lightning", "trl", "peft", "pandas", "pyarrow", "numpy", "vllm")


def stage_dir(out_dir: str | Path, task_name: str, model_slug: str) -> Path:
    return Path(out_dir) / task_name / model_slug


def ensure_writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as err:
        raise UserError(f"cannot write to '{path}' ({err.strerror}): pass a writable --out_dir") from err
    return path


def check_writable(path: Path) -> Path:
    """Fail now, creating nothing, if ``path`` could not be created and written later."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to '{path}' ('{probe}' is not a writable directory): pass a writable --out_dir")
    return path


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` then rename into place, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; artifacts are for the whole group to read
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_json(path: Path, fix: str) -> Any:
    """A JSON artifact; an unreadable one is a one-line error naming the file and ``fix``."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"'{path}' is not readable JSON ({type(err).__name__}): {fix}") from err


def write_json(path: Path, data: Any) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def provenance() -> dict[str, Any]:
    return {"versions": package_versions(), "git_commit": git_commit(), "host": platform.node()}

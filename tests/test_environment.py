"""environment.yml (the conda env for HPC) carries exactly pyproject.toml's pins."""

from __future__ import annotations

from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pip_section() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    return pip


def test_every_pyproject_pin_appears_identically():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip = _pip_section()
    missing = [req for req in project["dependencies"] + project["optional-dependencies"]["dev"] if req not in pip]
    assert not missing, f"environment.yml lacks (or pins differently): {missing}"
    assert "-e ." in pip


def test_environment_has_python_and_pip():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "rvg"
    assert any(str(d).startswith("python=3.11") for d in env["dependencies"]) and "pip" in env["dependencies"]

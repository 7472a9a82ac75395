"""The Makefile's setup is idempotent, and .ci/run runs `make test`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def _fake_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\n")
    (venv / "bin" / "python").chmod(0o755)
    return venv


def _make(*args: str) -> str:
    # Run as if from a shell, even when the suite itself runs under `make test`.
    drop = {"VENV", "MOCOLAB_VENV", "PYTEST_ARGS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run(["make", *args], cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout


def _dry_run(target: str, venv: Path) -> str:
    return _make("-n", target, f"VENV={venv}")


def test_setup_skipped_when_stamp_is_newer_than_pyproject(tmp_path):
    venv = _fake_venv(tmp_path)
    stamp = venv / ".mocolab-setup.stamp"
    stamp.touch()
    newer = (REPO / "pyproject.toml").stat().st_mtime + 10
    os.utime(stamp, (newer, newer))
    assert "pip install" not in _dry_run("setup", venv)


def test_setup_reinstalls_when_pyproject_changed(tmp_path):
    venv = _fake_venv(tmp_path)
    stamp = venv / ".mocolab-setup.stamp"
    stamp.touch()
    older = (REPO / "pyproject.toml").stat().st_mtime - 10
    os.utime(stamp, (older, older))
    plan = _dry_run("setup", venv)
    assert "pip install -e '.[dev]'" in plan and "ipykernel install --sys-prefix --name mocolab" in plan


def test_setup_creates_missing_venv(tmp_path):
    plan = _dry_run("setup", tmp_path / "new-venv")
    assert f"python3 -m venv {tmp_path / 'new-venv'}" in plan


def test_test_target_lints_then_passes_pytest_args(tmp_path):
    venv = _fake_venv(tmp_path)
    (venv / ".mocolab-setup.stamp").touch()
    os.utime(venv / ".mocolab-setup.stamp", None)
    plan = _make("-n", "test", f"VENV={venv}", "PYTEST_ARGS=-k smoke")
    assert f"{venv}/bin/python -m ruff check . && {venv}/bin/python -m pytest -k smoke" in plan


def test_default_target_prints_help():
    out = _make()
    for target in ["make tour", "make test", "make lab", "make setup", "make notebooks"]:
        assert target in out


def test_ci_script_runs_make_test():
    script = (REPO / ".ci" / "run").read_text()
    assert script.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in script
    assert "\nmake test " in script
    assert os.access(REPO / ".ci" / "run", os.X_OK)
    subprocess.run(["bash", "-n", str(REPO / ".ci" / "run")], check=True)

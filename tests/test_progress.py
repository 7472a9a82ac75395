"""Tests for mocolab.progress: the environment switches turn bars off."""
from __future__ import annotations

import pytest

from mocolab.progress import progress, progress_disabled


@pytest.mark.parametrize(
    "env, disabled",
    [
        ({}, False),
        ({"CI": "1"}, True),
        ({"CI": "true"}, True),
        ({"CI": "0"}, False),
        ({"CI": "false"}, False),
        ({"MOCOLAB_QUIET": "1"}, True),
        ({"CI": "", "MOCOLAB_QUIET": "yes"}, True),
    ],
)
def test_env_switches(monkeypatch, env, disabled):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("MOCOLAB_QUIET", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert progress_disabled() is disabled
    bar = progress(range(4), desc="t")
    assert bar.disable is disabled
    assert list(bar) == [0, 1, 2, 3]


def test_explicit_disable_and_manual_update(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("MOCOLAB_QUIET", raising=False)
    bar = progress(range(2), disable=True)
    assert bar.disable
    manual = progress(total=3, disable=True)
    manual.update(3)
    manual.set_postfix(loss=0.5)
    manual.close()

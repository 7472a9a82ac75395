"""Tests for mocolab.checks: each check returns the plain value or names the value and what is allowed."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mocolab import checks


def test_integers_accept_whole_numbers_only():
    assert checks.positive_int(3, "K") == 3 and checks.positive_int(2.0, "K") == 2
    assert checks.positive_int(np.int64(4), "K") == 4 and type(checks.positive_int(np.int64(4), "K")) is int
    assert checks.nonneg_int(0, "seed") == 0
    assert checks.integer(12, "num_classes", 2, 12) == 12
    for bad in (0, -1, 2.5, True, "3", None, math.inf, math.nan):
        with pytest.raises(ValueError, match=r"^K must be a positive integer, got "):
            checks.positive_int(bad, "K")
    with pytest.raises(ValueError, match=r"^seed must be an integer >= 0, got -1$"):
        checks.nonneg_int(-1, "seed")
    with pytest.raises(ValueError, match=r"^num_classes must be an integer in 2\.\.12, got 13$"):
        checks.integer(13, "num_classes", 2, 12)
    with pytest.raises(ValueError, match=r"got 'x'$"):
        checks.positive_int("x", "K")


def test_ranges_and_probabilities():
    assert checks.probability(1, "p") == 1.0 and checks.probability(np.float32(0.5), "p") == 0.5
    assert checks.in_range(torch.tensor(0.25), "beta", 0, 0.5, low_open=True) == 0.25
    with pytest.raises(ValueError, match=r"^p must be in \[0, 1\], got 1\.5$"):
        checks.probability(1.5, "p")
    with pytest.raises(ValueError, match=r"^tau must be in \[0, 1\), got 1\.0$"):
        checks.in_range(1.0, "tau", 0, 1, high_open=True)
    with pytest.raises(ValueError, match=r"^beta must be in \(0, 0\.5\] \(the query weighs less\), got 0$"):
        checks.in_range(0, "beta", 0, 0.5, low_open=True, why="the query weighs less")
    with pytest.raises(ValueError, match=r"^p must be a number in \[0, 1\], got 'a'$"):
        checks.probability("a", "p")
    for bad in (math.nan, True, None, [0.5]):
        with pytest.raises(ValueError, match="^p must be"):
            checks.probability(bad, "p")


def test_finite_positive_and_choice():
    assert checks.finite_positive(0.07, "T") == 0.07
    for bad in (0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match=r"^T must be a finite number > 0, got "):
            checks.finite_positive(bad, "T")
    with pytest.raises(ValueError, match=r"^T must be a number > 0, got 'warm'$"):
        checks.finite_positive("warm", "T")
    assert checks.choice("v2", "preset", ("v1", "v2")) == "v2"
    assert checks.choice("train", "split", {"train": 0, "test": 1}) == "train"
    with pytest.raises(ValueError, match=r"^preset must be one of \('v1', 'v2'\), got 'v3'$"):
        checks.choice("v3", "preset", ("v1", "v2"))

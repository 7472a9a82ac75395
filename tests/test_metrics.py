import math

import pytest
import torch
import torch.nn.functional as F

from mocolab.metrics import alignment, collapse_std, key_consistency, similarity_stats, uniformity


def test_alignment_oracle():
    x, y = F.normalize(torch.randn(10, 4), dim=1), F.normalize(torch.randn(10, 4), dim=1)
    expected = sum(float((a - b).norm()) ** 2 for a, b in zip(x, y)) / 10
    assert alignment(x, y) == pytest.approx(expected, rel=1e-5)
    assert alignment(x, x) == pytest.approx(0.0, abs=1e-6)


def test_uniformity_oracle_and_collapse():
    x = F.normalize(torch.randn(6, 3), dim=1)
    vals = [math.exp(-2 * float((x[i] - x[j]).norm()) ** 2) for i in range(6) for j in range(i + 1, 6)]
    assert uniformity(x) == pytest.approx(math.log(sum(vals) / len(vals)), rel=1e-5)
    collapsed = torch.ones(6, 3)
    assert uniformity(collapsed) == pytest.approx(0.0, abs=1e-6)


def test_collapse_std():
    assert collapse_std(torch.ones(50, 8)) == pytest.approx(0.0, abs=1e-6)
    spread = collapse_std(torch.randn(20000, 64))
    assert spread == pytest.approx(1 / math.sqrt(64), rel=0.05)


def test_key_consistency_and_similarity_stats():
    k = F.normalize(torch.randn(5, 4), dim=1)
    assert key_consistency(k, k) == pytest.approx(1.0)
    assert key_consistency(k, -k) == pytest.approx(-1.0)
    s = similarity_stats(k, k, F.normalize(torch.randn(4, 7), dim=0))
    assert s["pos_mean"] == pytest.approx(1.0) and s["neg"].shape == (35,)

"""Debiased contrastive loss (Chuang et al. 2020): closed forms, a naive-loop oracle, bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mocolab.losses import debiased_infonce_loss, infonce_logits


def naive_debiased(logits, tau_plus, T):
    """Chuang et al.'s formula written out one query at a time, in float64."""
    total = 0.0
    N, K = logits.shape[0], logits.shape[1] - 1
    for i in range(N):
        pos = math.exp(float(logits[i, 0]))
        neg = sum(math.exp(float(v)) for v in logits[i, 1:])
        ng = max((-tau_plus * K * pos + neg) / (1 - tau_plus), K * math.exp(-1 / T))
        total += -math.log(pos / (pos + ng))
    return total / N


def random_logits(N=6, K=20, C=8, T=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(N, C, generator=g), dim=1)
    k = F.normalize(q + 0.5 * torch.randn(N, C, generator=g), dim=1)
    queue = F.normalize(torch.randn(C, K, generator=g), dim=0)
    return infonce_logits(q, k, queue, T)[0]


def test_tau_plus_zero_is_infonce_when_clamp_inactive():
    T = 0.5
    logits = random_logits(T=T)
    # the clamp K·e^{-1/T} is inactive: every negative logit is above -1/T (cosine > -1)
    assert bool((logits[:, 1:] > -1 / T + 1e-3).all())
    expected = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))
    torch.testing.assert_close(debiased_infonce_loss(logits, 0.0, T), expected)


@pytest.mark.parametrize("tau_plus", [0.0, 0.1, 0.3, 0.7])
@pytest.mark.parametrize("T", [0.07, 0.2, 1.0])
def test_matches_naive_loop(tau_plus, T):
    logits = random_logits(N=5, K=12, T=T, seed=int(10 * tau_plus + T * 100)).double()
    got = debiased_infonce_loss(logits, tau_plus, T)
    assert got.item() == pytest.approx(naive_debiased(logits, tau_plus, T), rel=1e-9, abs=1e-9)


def test_clamp_closed_form():
    """When Ng hits its floor, L = log(1 + K·e^{-1/T} / pos) exactly."""
    T, K = 0.5, 4
    # large positive, tiny negatives: the corrected sum goes below the floor for τ⁺ = 0.9
    logits = torch.tensor([[1.0 / T, -1.0 / T, -1.0 / T, -1.0 / T, -1.0 / T]], dtype=torch.float64)
    got = debiased_infonce_loss(logits, 0.9, T)
    expected = math.log(1 + K * math.exp(-1 / T) / math.exp(1 / T))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_stable_at_small_temperature_and_has_gradient():
    T = 0.02
    logits = random_logits(T=T).requires_grad_(True)
    loss = debiased_infonce_loss(logits, 0.1, T)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert loss.item() == pytest.approx(naive_debiased(logits.detach().double(), 0.1, T), rel=1e-4)


def test_debiasing_lowers_the_loss():
    """Removing an estimated same-class share of the negatives can only shrink the denominator."""
    logits = random_logits(T=0.2)
    assert debiased_infonce_loss(logits, 0.2, 0.2) <= debiased_infonce_loss(logits, 0.0, 0.2)


@pytest.mark.parametrize("tau_plus,T,match", [(1.0, 0.1, "tau_plus"), (-0.1, 0.1, "tau_plus"), ("x", 0.1, "tau_plus"),
                                              (0.1, 0.0, "temperature")])
def test_bad_arguments(tau_plus, T, match):
    with pytest.raises(ValueError, match=match):
        debiased_infonce_loss(torch.zeros(2, 3), tau_plus, T)


def test_bad_logits_shape():
    with pytest.raises(ValueError, match="1\\+K"):
        debiased_infonce_loss(torch.zeros(2, 1), 0.1, 0.1)


def test_debiased_negative_term_reports_where_the_clamp_sets_ng():
    from mocolab.losses import debiased_negative_term

    T, K = 0.1, 8
    # row 0: the positive far above the negatives, so tau+ * K * pos > sum(neg) and Ng hits its floor;
    # row 1: positive and negatives alike, so the correction removes only a share of the negatives
    logits = torch.tensor([[0.9] + [0.1] * K, [0.2] + [0.2] * K], dtype=torch.float64) / T
    z, pos, ng, clamped = debiased_negative_term(logits, 0.1, T)
    assert clamped.tolist() == [True, False]
    shift = logits.max(dim=1).values
    floor = K * torch.exp(-1.0 / T - shift)
    torch.testing.assert_close(ng[0], floor[0])
    expected_1 = (-0.1 * K * z[1, 0].exp() + z[1, 1:].exp().sum()) / 0.9
    torch.testing.assert_close(ng[1], expected_1)
    # the loss is built on the same term
    torch.testing.assert_close(debiased_infonce_loss(logits, 0.1, T),
                               (torch.log(pos + ng) - z[:, 0]).mean())
    torch.testing.assert_close(pos, z[:, 0].exp())

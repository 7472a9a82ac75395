from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mocolab.losses import NCECriterion, infonce_logits, infonce_loss, margin_contrastive_loss, nce_loss, npair_loss


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_margin_loss_matches_loop():
    x1, x2 = unit(8, 5, seed=1), unit(8, 5, seed=2)
    y = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    margin = 1.2
    total = 0.0
    for a, b, yi in zip(x1, x2, y):
        d = math.sqrt(sum((float(u) - float(v)) ** 2 for u, v in zip(a, b)))
        total += 0.5 * d ** 2 if yi == 0 else 0.5 * max(0.0, margin - d) ** 2
    assert margin_contrastive_loss(x1, x2, y, margin).item() == pytest.approx(total / 8, rel=1e-5)


def test_margin_loss_zero_for_far_dissimilar_and_identical_similar():
    x = unit(4, 3)
    assert margin_contrastive_loss(x, x, torch.zeros(4)).item() == pytest.approx(0.0, abs=1e-6)
    assert margin_contrastive_loss(x, x + 10, torch.ones(4), margin=1.0).item() == 0.0


def test_npair_matches_sohn_formula():
    a, p = unit(6, 4, seed=3), unit(6, 4, seed=4)
    expected = 0.0
    for i in range(6):
        s = sum(math.exp(float(a[i] @ p[j] - a[i] @ p[i])) for j in range(6) if j != i)
        expected += math.log1p(s)
    assert npair_loss(a, p).item() == pytest.approx(expected / 6, rel=1e-5)


def test_npair_with_explicit_negatives():
    a, p, n = unit(3, 4, seed=5), unit(3, 4, seed=6), unit(3, 7, 4, seed=7)
    expected = sum(math.log1p(sum(math.exp(float(a[i] @ n[i, j] - a[i] @ p[i])) for j in range(7)))
                   for i in range(3)) / 3
    assert npair_loss(a, p, n).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_infonce_matches_loop(shared):
    N, C, K, T = 5, 8, 11, 0.2
    q, k = unit(N, C, seed=1), unit(N, C, seed=2)
    negs = unit(C, K, seed=3) if shared else unit(N, K, C, seed=3)
    logits, labels = infonce_logits(q, k, negs, T)
    assert logits.shape == (N, 1 + K) and labels.tolist() == [0] * N
    loss = 0.0
    for i in range(N):
        pos = float(q[i] @ k[i]) / T
        neg = [float(q[i] @ (negs[:, j] if shared else negs[i, j])) / T for j in range(K)]
        loss += -pos + math.log(math.exp(pos) + sum(math.exp(v) for v in neg))
    assert infonce_loss(q, k, negs, T).item() == pytest.approx(loss / N, rel=1e-5)


@pytest.mark.parametrize("K", [1, 16, 4096])
def test_infonce_collinear_is_ln_k_plus_1(K):
    v = unit(1, 8)
    q = v.repeat(4, 1)
    loss = infonce_loss(q, q.clone(), v.t().repeat(1, K), T=0.07)
    assert loss.item() == pytest.approx(math.log(K + 1), rel=1e-6)


@pytest.mark.parametrize("T", [0, -0.1, float("nan"), float("inf"), "hot"])
def test_infonce_rejects_bad_temperature(T):
    with pytest.raises(ValueError, match="temperature"):
        infonce_logits(unit(2, 3), unit(2, 3), unit(3, 4), T)


def test_bad_shapes_and_margin():
    with pytest.raises(ValueError, match="margin"):
        margin_contrastive_loss(unit(2, 3), unit(2, 3), torch.zeros(2), margin=0)
    with pytest.raises(ValueError, match=r"\(C, K\)"):
        infonce_logits(unit(2, 3), unit(2, 3), unit(4, 5), 0.1)
    with pytest.raises(ValueError, match="num_samples"):
        NCECriterion(0)


def test_nce_loss_matches_formula_and_z_is_estimated_once():
    M, T = 100, 0.1
    logits = torch.randn(4, 1 + 9) / T
    crit = NCECriterion(M)
    loss = crit(logits)
    Z = float(torch.exp(logits).mean() * M)
    assert crit.Z.item() == pytest.approx(Z, rel=1e-5)
    P = torch.exp(logits) / Z
    Pn, K = 1 / M, 9
    expected = -(torch.log(P[:, 0] / (P[:, 0] + K * Pn)) + torch.log(K * Pn / (P[:, 1:] + K * Pn)).sum(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    crit(logits * 2)  # a second batch does not change Z
    assert crit.Z.item() == pytest.approx(Z, rel=1e-5)
    with pytest.raises(ValueError, match="Z"):
        nce_loss(logits, M, 0.0)


def test_a_loss_without_negatives_raises_instead_of_returning_zero():
    from mocolab.losses import check_temperature

    q, k = unit(4, 8, seed=1), unit(4, 8, seed=2)
    logits, _ = infonce_logits(q, k, torch.empty(8, 0))  # an empty queue's first step: the logits are allowed
    assert logits.shape == (4, 1)
    with pytest.raises(ValueError, match=r"no negatives \(K = 0\)"):
        infonce_loss(q, k, torch.empty(8, 0))
    with pytest.raises(ValueError, match=r"no negatives \(K = 0\)"):
        npair_loss(q, k, torch.empty(4, 0, 8))
    with pytest.raises(ValueError, match="N >= 2"):
        npair_loss(q[:1], k[:1])
    with pytest.raises(ValueError, match=r"no negatives \(K = 0\)"):
        nce_loss(torch.zeros(4, 1), num_samples=10, Z=1.0)
    for bad in (float("inf"), float("nan"), 0.0):
        with pytest.raises(ValueError, match="finite number > 0"):
            check_temperature(bad)
        with pytest.raises(ValueError, match="temperature T"):
            infonce_loss(q, k, unit(8, 5).t(), T=bad)


def test_margin_loss_accepts_only_labels_0_and_1():
    x1, x2 = unit(4, 3, seed=1), unit(4, 3, seed=2)
    with pytest.raises(ValueError, match=r"0 \(similar pair\) or 1 \(dissimilar pair\), got \[-1, 2\]"):
        margin_contrastive_loss(x1, x2, torch.tensor([0, 2, 1, -1]))
    assert torch.isfinite(margin_contrastive_loss(x1, x2, torch.tensor([0.0, 1.0, 1.0, 0.0])))

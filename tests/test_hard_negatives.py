"""MoCHi mixing, DebiasedMoCo and clustering-aware negatives (k-means itself: test_kmeans.py)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mocolab.hard_negatives import ClusterMoCo, DebiasedMoCo, MoCHi, false_negative_rate, mix_hard_negatives
from mocolab.losses import debiased_infonce_loss
from mocolab.moco import MoCo


def unit(*shape, dim=-1, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=dim)


# ----------------------------------------------------------------------------- MoCHi mixing
def test_mix_shapes_unit_norm_and_coefficient_ranges():
    q, queue = unit(5, 8), unit(8, 40, dim=0, seed=1)
    out = mix_hard_negatives(q, queue, n_hard=10, s=7, s_prime=3, beta_max=0.5,
                             generator=torch.Generator().manual_seed(0))
    assert out.h.shape == (5, 10, 8) and out.alpha.shape == (5, 7) and out.beta.shape == (5, 3)
    assert out.hard_index.shape == (5, 10)
    torch.testing.assert_close(out.h.norm(dim=2), torch.ones(5, 10))
    assert bool(((out.alpha >= 0) & (out.alpha < 1)).all())
    assert bool(((out.beta >= 0) & (out.beta < 0.5)).all())
    assert not out.h.requires_grad


def test_hard_index_are_the_top_similarities():
    q, queue = unit(4, 8), unit(8, 30, dim=0, seed=2)
    out = mix_hard_negatives(q, queue, n_hard=5, s=1, s_prime=1)
    sims = q @ queue
    for i in range(4):  # naive oracle: sort each row
        expected = sorted(range(30), key=lambda j: -float(sims[i, j]))[:5]
        assert out.hard_index[i].tolist() == expected


def test_pair_mixes_combine_two_hard_negatives_with_alpha():
    q, queue = unit(3, 6), unit(6, 12, dim=0, seed=3)
    out = mix_hard_negatives(q, queue, n_hard=4, s=20, s_prime=0, generator=torch.Generator().manual_seed(1))
    for i in range(3):
        hard = queue[:, out.hard_index[i]].t()  # (4, C)
        for j in range(20):
            a = float(out.alpha[i, j])
            candidates = [F.normalize(a * hard[u] + (1 - a) * hard[v], dim=0) for u in range(4) for v in range(4)]
            assert min(float((c - out.h[i, j]).norm()) for c in candidates) < 1e-5


def test_query_mix_weighs_the_query_less_than_the_negative():
    q, queue = unit(6, 8), unit(8, 50, dim=0, seed=4)
    out = mix_hard_negatives(q, queue, n_hard=10, s=0, s_prime=30, beta_max=0.5,
                             generator=torch.Generator().manual_seed(2))
    for i in range(6):
        hard = queue[:, out.hard_index[i]].t()  # (H, C)
        for j in range(30):
            b = float(out.beta[i, j])
            h = out.h[i, j]
            # h = normalize(β q + (1 − β) n) for one of the hard keys n
            errors = torch.stack([(F.normalize(b * q[i] + (1 - b) * n, dim=0) - h).norm() for n in hard])
            assert float(errors.min()) < 1e-5
            n = hard[errors.argmin()]
            # the query weighs less: h is at least as close to the negative as to the query
            assert float(h @ n) >= float(h @ q[i]) - 1e-6


def test_n_hard_larger_than_K_is_clipped():
    out = mix_hard_negatives(unit(2, 4), unit(4, 3, dim=0), n_hard=100, s=2, s_prime=2)
    assert out.hard_index.shape == (2, 3)


@pytest.mark.parametrize("kw,match", [(dict(n_hard=0), "n_hard"), (dict(s=-1), "s \\(pair"),
                                      (dict(s_prime=1.5), "s_prime"), (dict(beta_max=0.6), "beta_max"),
                                      (dict(beta_max=0.0), "beta_max")])
def test_mix_bad_arguments(kw, match):
    args = dict(n_hard=4, s=2, s_prime=2, beta_max=0.5)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        mix_hard_negatives(unit(2, 4), unit(4, 8, dim=0), **args)


def test_mix_bad_shapes():
    with pytest.raises(ValueError, match="same C"):
        mix_hard_negatives(unit(2, 4), unit(5, 8, dim=0), 4, 2, 2)


# ----------------------------------------------------------------------------- MoCHi model
def test_mochi_logits_shape_no_grad_through_synthetic_and_warmup(tiny_encoder):
    torch.manual_seed(0)
    model = MoCHi(tiny_encoder, dim=16, K=32, m=0.9, T=0.2, n_hard=8, s=5, s_prime=3, warmup_steps=1)
    x = torch.randn(4, 3, 32, 32)
    logits, labels = model(x, x)  # warm-up step: plain MoCo
    assert logits.shape == (4, 1 + 32) and model.mixing
    logits, labels = model(x, x)
    assert logits.shape == (4, 1 + 32 + 8) and labels.shape == (4,)
    loss = model.loss(logits, labels)
    loss.backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert not model.last_mix.h.requires_grad
    # the synthetic columns are q·h / T for the unit-norm synthetic points
    q = F.normalize(model.encoder_q(x), dim=1)
    torch.testing.assert_close(logits[:, 33:], torch.einsum("nc,nsc->ns", q, model.last_mix.h) / 0.2,
                               atol=1e-5, rtol=1e-5)


def test_mochi_without_synthetic_equals_moco(tiny_encoder):
    torch.manual_seed(0)
    moco = MoCo(tiny_encoder, dim=16, K=32, m=0.9, T=0.2)
    mochi = MoCHi(tiny_encoder, dim=16, K=32, m=0.9, T=0.2, n_hard=4, s=0, s_prime=0)
    assert set(mochi.state_dict()) - set(moco.state_dict()) == {"step_count"}  # MoCo's state, and the step
    mochi.load_state_dict(moco.state_dict(), strict=False)
    x, y = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(mochi(x, y)[0], moco(x, y)[0])


@pytest.mark.parametrize("kw,match", [(dict(n_hard=0), "n_hard"), (dict(beta_max=0.7), "beta_max"),
                                      (dict(warmup_steps=-1), "warmup_steps"), (dict(T=0), "temperature")])
def test_mochi_bad_arguments(tiny_encoder, kw, match):
    with pytest.raises(ValueError, match=match):
        MoCHi(tiny_encoder, dim=16, K=32, **kw)


# ----------------------------------------------------------------------------- debiased MoCo
def test_debiased_moco_loss(tiny_encoder):
    torch.manual_seed(0)
    model = DebiasedMoCo(tiny_encoder, dim=16, K=32, T=0.2, tau_plus=0.1)
    x = torch.randn(4, 3, 32, 32)
    logits, labels = model(x, x)
    torch.testing.assert_close(model.loss(logits, labels), debiased_infonce_loss(logits, 0.1, 0.2))
    model.loss(logits, labels).backward()
    with pytest.raises(ValueError, match="tau_plus"):
        DebiasedMoCo(tiny_encoder, dim=16, K=32, tau_plus=1.0)


# ----------------------------------------------------------------------------- false negatives
def test_false_negative_rate_oracle():
    yq = torch.tensor([0, 1])
    yn = torch.tensor([0, 0, 1, -1])  # the last one unknown
    # query 0: 2 of 3 same; query 1: 1 of 3 -> 3/6
    assert false_negative_rate(yq, yn) == pytest.approx(0.5)
    w = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.5, 1.0]])
    # query 0: weights (0,0,1) -> 0 same of 1; query 1: (1,1,0.5) same 0.5 -> 0.5 / 3.5
    assert false_negative_rate(yq, yn, w) == pytest.approx(0.5 / 3.5)
    assert math.isnan(false_negative_rate(yq, torch.tensor([-1, -1])))
    with pytest.raises(ValueError, match="weights"):
        false_negative_rate(yq, yn, -w)


# ----------------------------------------------------------------------------- ClusterMoCo
def test_cluster_moco_drops_same_cluster_negatives_and_counts_false_negatives(tiny_encoder):
    torch.manual_seed(0)
    model = ClusterMoCo(tiny_encoder, dim=16, K=16, m=0.9, T=0.2, num_clusters=2, recluster_every=1,
                        same_cluster_weight=0.0, queue_init="empty")
    labels = torch.tensor([0, 1] * 8)
    model.set_class_labels(labels)
    x = torch.randn(8, 3, 32, 32)
    for step in range(3):
        idx = torch.arange(8) + 8 * (step % 2)
        logits, lab = model(x + 0.1 * step, x, index=idx)
    assert bool(model.has_centroids)
    # dropped negatives are exactly those whose nearest centroid is the query's
    q = F.normalize(model.encoder_q(x + 0.2), dim=1)
    w = model.negative_weights(q, model.negatives())
    assert set(w.unique().tolist()) <= {0.0, 1.0}
    loss = model.loss(logits, lab)
    assert torch.isfinite(loss)
    loss.backward()
    rates = model.false_negative_rates()
    assert 0.0 <= rates["before"] <= 1.0 and (math.isnan(rates["after"]) or 0.0 <= rates["after"] <= 1.0)


def test_cluster_moco_weight_one_is_moco(tiny_encoder):
    torch.manual_seed(0)
    moco = MoCo(tiny_encoder, dim=16, K=32, m=0.9, T=0.2)
    cm = ClusterMoCo(tiny_encoder, dim=16, K=32, m=0.9, T=0.2, num_clusters=3, same_cluster_weight=1.0)
    cm.load_state_dict(moco.state_dict(), strict=False)
    x, y = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(cm(x, y)[0], moco(x, y)[0])


def test_cluster_moco_warmup_is_plain_moco_until_the_first_clustering(tiny_encoder):
    torch.manual_seed(0)
    moco = MoCo(tiny_encoder, dim=16, K=32, m=0.9, T=0.2)
    cm = ClusterMoCo(tiny_encoder, dim=16, K=32, m=0.9, T=0.2, num_clusters=3, warmup_steps=2)
    cm.load_state_dict(moco.state_dict(), strict=False)
    x, y = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    for _ in range(2):  # the warm-up: no clustering, every negative kept, the same logits as MoCo
        torch.testing.assert_close(cm(x, y, index=torch.arange(8))[0], moco(x, y, index=torch.arange(8))[0])
        assert not bool(cm.has_centroids)
    cm(x, y, index=torch.arange(8))  # step 2: the first clustering
    assert bool(cm.has_centroids)


def test_cluster_moco_logits_follow_the_weights(tiny_encoder):
    torch.manual_seed(0)
    model = ClusterMoCo(tiny_encoder, dim=16, K=32, T=0.2, num_clusters=3, same_cluster_weight=0.5)
    model.recluster()  # no real keys yet: nothing to cluster
    assert not bool(model.has_centroids)
    model.enqueue(unit(32, 16, seed=5), torch.arange(32))
    model.recluster()
    assert bool(model.has_centroids)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    negatives = model.negatives().clone()
    q = F.normalize(model.encoder_q(x), dim=1)
    w = model.negative_weights(q, negatives)
    logits, _ = model(x, x)
    torch.testing.assert_close(logits[:, 1:], (q @ negatives) / 0.2 + torch.log(w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw,match", [(dict(num_clusters=1), "num_clusters"), (dict(num_clusters=64), "queue size"),
                                      (dict(recluster_every=0), "recluster_every"),
                                      (dict(same_cluster_weight=1.5), "same_cluster_weight"),
                                      (dict(kmeans_iters=0), "kmeans_iters"),
                                      (dict(warmup_steps=-1), "warmup_steps")])
def test_cluster_moco_bad_arguments(tiny_encoder, kw, match):
    with pytest.raises(ValueError, match=match):
        ClusterMoCo(tiny_encoder, dim=16, K=32, **kw)

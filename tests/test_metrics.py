from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mocolab.metrics import (
    alignment,
    collapse_std,
    default_similarities,
    key_consistency,
    nearest_and_hardest,
    similarity_stats,
    temperature_softmax,
    uniformity,
)


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


# -- KeyConsistencyProbe ------------------------------------------------------------------------
from types import SimpleNamespace  # noqa: E402

from mocolab.metrics import KeyConsistencyProbe  # noqa: E402
from mocolab.moco import MoCo  # noqa: E402


def _train(model, probe, steps, n=4, lr=0.5):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        im_q, im_k = torch.randn(n, 3, 16, 16), torch.randn(n, 3, 16, 16)
        logits, labels = model(im_q, im_k)
        loss = model.loss(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        probe(SimpleNamespace(model=model, step=step, im_q=im_q, im_k=im_k))


def test_probe_keeps_the_enqueued_keys_and_a_frozen_key_encoder_is_consistent(tiny_encoder):
    torch.manual_seed(0)
    model = MoCo(tiny_encoder, dim=8, K=10, m=1.0, T=0.1)  # m = 1: the key encoder never changes
    probe = KeyConsistencyProbe()
    _train(model, probe, steps=5)
    assert probe.steps == 3 and len(probe) == 3  # ceil(K / N) = ceil(10 / 4): the whole queue (wraps)
    views, stored = probe._kept[-1]
    torch.testing.assert_close(stored, F.normalize(model.encoder_k(views[0]), dim=1))  # the oracle: train-mode keys
    r = probe.measure(model)
    assert r["mean"] == pytest.approx(1.0, abs=1e-5) and r["num_keys"] == 12
    assert r["by_age"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    assert r["identification"] == pytest.approx(100.0) and 0.0 < r["margin"] <= 1.0 + 1e-5


def test_probe_relative_measures_see_through_collapse(tiny_encoder):
    # every key the same vector: the cosine says "consistent", identification and margin do not
    model = MoCo(tiny_encoder, dim=8, K=8, m=1.0, T=0.1)
    for p in model.encoder_k.parameters():
        p.data.zero_()
    model.encoder_k.fc.bias.data[0] = 1.0  # constant output e_0 for every input
    probe = KeyConsistencyProbe(steps=2)
    for _ in range(2):
        im_q, im_k = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
        model(im_q, im_k)
        probe.record(model, im_q, im_k)
    r = probe.measure(model)
    assert r["mean"] == pytest.approx(1.0) and r["margin"] == pytest.approx(0.0, abs=1e-6)
    assert r["identification"] <= 100.0 / 8 + 1e-6  # ties go to the first stored key: only one row is "right"


def test_probe_sees_a_fast_key_encoder_drift_and_leaves_bn_statistics_alone(tiny_encoder):
    torch.manual_seed(0)
    model = MoCo(tiny_encoder, dim=8, K=12, m=0.0, T=0.1)  # m = 0: the key encoder copies the query encoder each step
    probe = KeyConsistencyProbe(steps=3)
    _train(model, probe, steps=6)
    stats = [b.clone() for b in model.encoder_k.buffers()]
    r = probe.measure(model)
    assert r["by_age"][0] == pytest.approx(1.0, abs=1e-5)  # the latest keys came from this very key encoder
    assert max(r["by_age"][1:]) < 1.0 - 1e-4 and r["mean"] < 1.0  # older keys came from older encoders
    for before, after in zip(stats, model.encoder_k.buffers()):
        torch.testing.assert_close(before, after)
    assert KeyConsistencyProbe(steps=3, bn="eval").bn == "eval"
    history = {}
    probe.on_epoch(1, history)
    assert history["key_consistency"] == [pytest.approx(r["mean"])] and probe.last["by_age"] == r["by_age"]
    assert set(history) == {"key_consistency", "key_identification", "key_margin"}


def test_probe_symmetric_model_and_bad_arguments(tiny_encoder):
    torch.manual_seed(0)
    model = MoCo(tiny_encoder, dim=8, K=16, m=1.0, T=0.1, symmetric=True)
    probe = KeyConsistencyProbe(steps=2)
    _train(model, probe, steps=2)
    r = probe.measure(model)
    assert r["num_keys"] == 16 and r["mean"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="steps"):
        KeyConsistencyProbe(steps=0)
    with pytest.raises(ValueError, match="bn"):
        KeyConsistencyProbe(bn="frozen")
    with pytest.raises(ValueError, match="no step recorded"):
        KeyConsistencyProbe().measure(model)


# --------------------------------------------------------------------------- temperature_softmax
@pytest.mark.parametrize("T", [0.01, 0.07, 0.5, 1.0, 10.0])
def test_temperature_softmax_properties_and_oracle(T):
    sims = torch.rand(17, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (K+1,)
    r = temperature_softmax(sims, T)
    assert r["probs"].shape == (17,)
    assert r["probs"].sum() == pytest.approx(1.0, abs=1e-12)
    # oracle: cross-entropy with the positive at index 0
    expected = F.cross_entropy((sims.double() / T)[None], torch.zeros(1, dtype=torch.long))
    assert r["loss"] == pytest.approx(float(expected), rel=1e-9, abs=1e-12)
    p = torch.softmax(sims.double() / T, 0)
    assert r["entropy"] == pytest.approx(float(-(p * p.clamp_min(1e-300).log()).sum()), rel=1e-9, abs=1e-12)
    assert 0.0 <= r["entropy"] <= math.log(17) + 1e-12


def test_temperature_softmax_small_T_is_one_hot_on_argmax():
    sims = np.array([0.2, 0.9, -0.3, 0.5])
    r = temperature_softmax(sims, 1e-4)
    np.testing.assert_allclose(r["probs"], [0, 1, 0, 0], atol=1e-12)
    assert r["entropy"] < 1e-6
    assert r["loss"] == pytest.approx((0.9 - 0.2) / 1e-4, rel=1e-6)  # no overflow, no inf


def test_temperature_softmax_large_T_is_uniform():
    r = temperature_softmax(np.array([0.9, -0.5, 0.1]), 1e6)
    np.testing.assert_allclose(r["probs"], np.full(3, 1 / 3), atol=1e-6)


@pytest.mark.parametrize("K", [1, 15, 4096])
@pytest.mark.parametrize("T", [0.07, 1.0])
def test_collinear_similarities_give_chance_loss(K, T):
    r = temperature_softmax(np.full(K + 1, 0.37), T)
    assert r["loss"] == pytest.approx(math.log(K + 1), rel=1e-12)
    assert r["entropy"] == pytest.approx(math.log(K + 1), rel=1e-12)
    assert r["chance_loss"] == pytest.approx(math.log(K + 1))


@pytest.mark.parametrize("T", [0, -1, float("nan"), float("inf"), "0.1"])
def test_temperature_softmax_rejects_bad_T(T):
    with pytest.raises(ValueError, match="T must be"):
        temperature_softmax([0.5, 0.1], T)


def test_temperature_softmax_rejects_bad_similarities():
    with pytest.raises(ValueError, match="at least one negative"):
        temperature_softmax([0.5], 0.1)
    with pytest.raises(ValueError, match="finite"):
        temperature_softmax([0.5, float("nan")], 0.1)


# --------------------------------------------------------------------------- nearest_and_hardest
def _oracle(q, keys, labels, ql, k, exclude=None):
    qn = q / q.norm()
    kn = keys / keys.norm(dim=1, keepdim=True)
    sims = [float(kn[i] @ qn) for i in range(len(keys))]
    same = [i for i in range(len(keys)) if labels[i] == ql and i != exclude]
    diff = [i for i in range(len(keys)) if labels[i] != ql and i != exclude]
    near = sorted(same, key=lambda i: (-sims[i], i))[:k]
    hard = sorted(diff, key=lambda i: (-sims[i], i))[:k]
    return near, hard, sims


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nearest_and_hardest_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(40, 6, generator=g)  # (M, C)
    labels = torch.randint(0, 3, (40,), generator=g)  # (M,)
    q, ql = keys[5], int(labels[5])
    res = nearest_and_hardest(q, keys, labels, ql, k=4, exclude_index=5)
    near, hard, sims = _oracle(q, keys, labels, ql, 4, exclude=5)
    assert res.nearest.tolist() == near
    assert res.hardest.tolist() == hard
    torch.testing.assert_close(res.nearest_sims, torch.tensor([sims[i] for i in near]), atol=1e-5, rtol=0)
    assert all(labels[i] != ql for i in res.hardest)
    # without exclusion the query itself is its own nearest key (similarity 1)
    assert nearest_and_hardest(q, keys, labels, ql, k=1).nearest.tolist() == [5]


def test_nearest_and_hardest_ties_and_few_candidates():
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    res = nearest_and_hardest(torch.tensor([1.0, 0.0]), keys, [0, 1, 1, 0], 0, k=5)
    assert res.nearest.tolist() == [0, 3]  # tie broken by index
    assert res.hardest.tolist() == [1, 2]
    with pytest.raises(ValueError, match="k must be a positive integer"):
        nearest_and_hardest(keys[0], keys, [0, 1, 1, 0], 0, k=0)
    with pytest.raises(ValueError, match="one label per key"):
        nearest_and_hardest(keys[0], keys, [0, 1], 0)


def test_default_similarities_positive_first_and_seeded():
    s = default_similarities(8, seed=1)
    assert s.shape == (9,) and s[0] == 0.6 and np.all(np.abs(s) <= 1)
    np.testing.assert_array_equal(s, default_similarities(8, seed=1))

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from mocolab.encoders import ConvNet
from mocolab.momentum import (
    MomentumUpdater,
    check_momentum,
    cosine_momentum,
    ema_track,
    freeze,
    momentum_at,
    momentum_update,
)


def pair(seed=0):
    torch.manual_seed(seed)
    q = ConvNet(num_classes=8, width=4)
    k = ConvNet(num_classes=8, width=4)
    return k, q


def test_matches_official_per_parameter_formula():
    k, q = pair()
    ref = copy.deepcopy(k)
    for pk, pq in zip(ref.parameters(), q.parameters()):
        pk.data = pk.data * 0.9 + pq.data * (1.0 - 0.9)
    momentum_update(k, q, 0.9)
    for a, b in zip(k.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_m1_freezes_and_m0_copies():
    k, q = pair()
    before = [p.clone() for p in k.parameters()]
    momentum_update(k, q, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(k.parameters(), before))
    momentum_update(k, q, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(k.parameters(), q.parameters()))


def test_in_place_no_new_tensors():
    k, q = pair()
    ptrs = [p.data_ptr() for p in k.parameters()]
    up = MomentumUpdater(k, q)
    up(0.99)
    assert ptrs == [p.data_ptr() for p in k.parameters()]


def test_buffers_option():
    k, q = pair()
    q.features[0][1].running_mean.fill_(2.0)
    momentum_update(k, q, 0.5, buffers=False)
    assert k.features[0][1].running_mean.abs().max() == 0
    momentum_update(k, q, 0.5, buffers=True)
    torch.testing.assert_close(k.features[0][1].running_mean, torch.full((4,), 1.0))


@pytest.mark.parametrize("m", [-0.1, 1.5, "x", float("nan")])
def test_bad_momentum(m):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_momentum(m)


def test_cosine_schedule():
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert momentum_at("constant", 0.9, 50, 100) == 0.9
    with pytest.raises(ValueError, match="schedule"):
        momentum_at("linear", 0.9, 0, 1)


# --------------------------------------------------------------------------- ema_track
@pytest.mark.parametrize("target", ["random_walk", "step"])
def test_ema_m0_tracks_exactly_and_m1_never_moves(target):
    r0 = ema_track(0.0, 100, target)
    np.testing.assert_array_equal(r0["ema"], r0["target"])
    assert r0["lag"] == 0.0
    r1 = ema_track(1.0, 100, target)
    np.testing.assert_array_equal(r1["ema"], np.full(100, r1["target"][0]))
    assert r1["mean_drift"] == 0.0 and math.isinf(r1["time_constant"])


def test_ema_matches_naive_loop_and_drift_formula():
    m = 0.9
    target = [math.sin(t / 5) for t in range(50)]
    r = ema_track(m, 50, lambda t: math.sin(t / 5))
    ema = [target[0]]
    for t in range(1, 50):
        ema.append(m * ema[-1] + (1 - m) * target[t])
    np.testing.assert_allclose(r["ema"], ema, rtol=1e-12)
    # drift per step = (1 - m) * |target[t] - ema[t-1]|
    np.testing.assert_allclose(r["drift"][1:], (1 - m) * np.abs(np.array(target[1:]) - np.array(ema[:-1])))
    assert r["half_life"] == pytest.approx(math.log(0.5) / math.log(m))
    assert r["time_constant"] == pytest.approx(10.0)


@pytest.mark.parametrize("target,seed", [("step", 0), ("random_walk", 0), ("random_walk", 3)])
def test_lag_grows_with_m(target, seed):
    lags = [ema_track(m, 400, target, seed=seed)["lag"] for m in (0.0, 0.5, 0.9, 0.99, 1.0)]
    assert all(a < b for a, b in zip(lags, lags[1:])), lags
    drifts = [ema_track(m, 400, "step")["drift"].max() for m in (0.0, 0.5, 0.9, 0.99, 1.0)]
    assert all(a > b for a, b in zip(drifts, drifts[1:])), drifts


def test_ema_step_response_closed_form():
    m, at = 0.8, 10
    r = ema_track(m, 30, "step", step_at=at)
    t = np.arange(at, 30)
    np.testing.assert_allclose(r["ema"][at:], 1 - m ** (t - at + 1), rtol=1e-12)


def test_ema_vector_target():
    target = np.random.default_rng(0).normal(size=(20, 3))
    r = ema_track(0.5, 20, target)
    assert r["ema"].shape == (20, 3) and r["drift"].shape == (20,)
    np.testing.assert_allclose(r["drift"][1], np.linalg.norm(r["ema"][1] - r["ema"][0]))


def test_ema_bad_input():
    with pytest.raises(ValueError, match=r"m must be in \[0, 1\]"):
        ema_track(1.5)
    with pytest.raises(ValueError, match="steps must be"):
        ema_track(0.9, steps=1)
    with pytest.raises(ValueError, match="target must be one of"):
        ema_track(0.9, target="sine")
    with pytest.raises(ValueError, match="steps=10 rows"):
        ema_track(0.9, 10, np.zeros(5))


def test_freeze_turns_gradients_off_in_place():
    net = ConvNet(num_classes=8, width=4)
    assert freeze(net) is net and not any(p.requires_grad for p in net.parameters())

import copy
import math

import pytest
import torch

from mocolab.encoders import ConvNet
from mocolab.momentum import MomentumUpdater, check_momentum, cosine_momentum, momentum_at, momentum_update


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

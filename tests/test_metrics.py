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


# -- KeyConsistencyProbe ------------------------------------------------------------------------
from types import SimpleNamespace  # noqa: E402

from mocolab.encoders import ConvNet  # noqa: E402
from mocolab.metrics import KeyConsistencyProbe  # noqa: E402
from mocolab.moco import MoCo  # noqa: E402


def _tiny(num_classes=8):
    return ConvNet(num_classes=num_classes, width=4)


def _train(model, probe, steps, n=4, lr=0.5):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        im_q, im_k = torch.randn(n, 3, 16, 16), torch.randn(n, 3, 16, 16)
        logits, labels = model(im_q, im_k)
        loss = model.criterion(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        probe(SimpleNamespace(model=model, step=step, im_q=im_q, im_k=im_k))


def test_probe_keeps_the_enqueued_keys_and_a_frozen_key_encoder_is_consistent():
    torch.manual_seed(0)
    model = MoCo(_tiny, dim=8, K=10, m=1.0, T=0.1)  # m = 1: the key encoder never changes
    probe = KeyConsistencyProbe()
    _train(model, probe, steps=5)
    assert probe.steps == 3 and len(probe) == 3  # ceil(K / N) = ceil(10 / 4): the whole queue (wraps)
    views, stored = probe._kept[-1]
    torch.testing.assert_close(stored, F.normalize(model.encoder_k(views[0]), dim=1))  # the oracle: train-mode keys
    r = probe.measure(model)
    assert r["mean"] == pytest.approx(1.0, abs=1e-5) and r["num_keys"] == 12
    assert r["by_age"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    assert r["identification"] == pytest.approx(100.0) and 0.0 < r["margin"] <= 1.0 + 1e-5


def test_probe_relative_measures_see_through_collapse():
    # every key the same vector: the cosine says "consistent", identification and margin do not
    model = MoCo(_tiny, dim=8, K=8, m=1.0, T=0.1)
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


def test_probe_sees_a_fast_key_encoder_drift_and_leaves_bn_statistics_alone():
    torch.manual_seed(0)
    model = MoCo(_tiny, dim=8, K=12, m=0.0, T=0.1)  # m = 0: the key encoder copies the query encoder each step
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


def test_probe_symmetric_model_and_bad_arguments():
    torch.manual_seed(0)
    model = MoCo(_tiny, dim=8, K=16, m=1.0, T=0.1, symmetric=True)
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

"""Tests for mocolab.widgets: the explorers' maths, then the widgets built headless."""
import math
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mocolab import widgets as W  # noqa: E402


# --------------------------------------------------------------------------- temperature_softmax
@pytest.mark.parametrize("T", [0.01, 0.07, 0.5, 1.0, 10.0])
def test_temperature_softmax_properties_and_oracle(T):
    sims = torch.rand(17, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (K+1,)
    r = W.temperature_softmax(sims, T)
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
    r = W.temperature_softmax(sims, 1e-4)
    np.testing.assert_allclose(r["probs"], [0, 1, 0, 0], atol=1e-12)
    assert r["entropy"] < 1e-6
    assert r["loss"] == pytest.approx((0.9 - 0.2) / 1e-4, rel=1e-6)  # no overflow, no inf


def test_temperature_softmax_large_T_is_uniform():
    r = W.temperature_softmax(np.array([0.9, -0.5, 0.1]), 1e6)
    np.testing.assert_allclose(r["probs"], np.full(3, 1 / 3), atol=1e-6)


@pytest.mark.parametrize("K", [1, 15, 4096])
@pytest.mark.parametrize("T", [0.07, 1.0])
def test_collinear_similarities_give_chance_loss(K, T):
    r = W.temperature_softmax(np.full(K + 1, 0.37), T)
    assert r["loss"] == pytest.approx(math.log(K + 1), rel=1e-12)
    assert r["entropy"] == pytest.approx(math.log(K + 1), rel=1e-12)
    assert r["chance_loss"] == pytest.approx(math.log(K + 1))


@pytest.mark.parametrize("T", [0, -1, float("nan"), float("inf"), "0.1"])
def test_temperature_softmax_rejects_bad_T(T):
    with pytest.raises(ValueError, match="T must be"):
        W.temperature_softmax([0.5, 0.1], T)


def test_temperature_softmax_rejects_bad_similarities():
    with pytest.raises(ValueError, match="at least one negative"):
        W.temperature_softmax([0.5], 0.1)
    with pytest.raises(ValueError, match="finite"):
        W.temperature_softmax([0.5, float("nan")], 0.1)


# --------------------------------------------------------------------------- ema_track
@pytest.mark.parametrize("target", ["random_walk", "step"])
def test_ema_m0_tracks_exactly_and_m1_never_moves(target):
    r0 = W.ema_track(0.0, 100, target)
    np.testing.assert_array_equal(r0["ema"], r0["target"])
    assert r0["lag"] == 0.0
    r1 = W.ema_track(1.0, 100, target)
    np.testing.assert_array_equal(r1["ema"], np.full(100, r1["target"][0]))
    assert r1["mean_drift"] == 0.0 and math.isinf(r1["time_constant"])


def test_ema_matches_naive_loop_and_drift_formula():
    m = 0.9
    target = [math.sin(t / 5) for t in range(50)]
    r = W.ema_track(m, 50, lambda t: math.sin(t / 5))
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
    lags = [W.ema_track(m, 400, target, seed=seed)["lag"] for m in (0.0, 0.5, 0.9, 0.99, 1.0)]
    assert all(a < b for a, b in zip(lags, lags[1:])), lags
    drifts = [W.ema_track(m, 400, "step")["drift"].max() for m in (0.0, 0.5, 0.9, 0.99, 1.0)]
    assert all(a > b for a, b in zip(drifts, drifts[1:])), drifts


def test_ema_step_response_closed_form():
    m, at = 0.8, 10
    r = W.ema_track(m, 30, "step", step_at=at)
    t = np.arange(at, 30)
    np.testing.assert_allclose(r["ema"][at:], 1 - m ** (t - at + 1), rtol=1e-12)


def test_ema_vector_target():
    target = np.random.default_rng(0).normal(size=(20, 3))
    r = W.ema_track(0.5, 20, target)
    assert r["ema"].shape == (20, 3) and r["drift"].shape == (20,)
    np.testing.assert_allclose(r["drift"][1], np.linalg.norm(r["ema"][1] - r["ema"][0]))


def test_ema_bad_input():
    with pytest.raises(ValueError, match=r"m must be in \[0, 1\]"):
        W.ema_track(1.5)
    with pytest.raises(ValueError, match="steps must be"):
        W.ema_track(0.9, steps=1)
    with pytest.raises(ValueError, match="target must be one of"):
        W.ema_track(0.9, target="sine")
    with pytest.raises(ValueError, match="steps=10 rows"):
        W.ema_track(0.9, 10, np.zeros(5))


# --------------------------------------------------------------------------- queue_staleness
@pytest.mark.parametrize("K,B", [(4096, 256), (1000, 128), (65536, 256), (100, 1), (5, 8), (1, 1)])
def test_queue_staleness_closed_form(K, B):
    r = W.queue_staleness(K, B, steps_per_epoch=50, m=0.99)
    oldest = math.ceil(K / B)
    assert r["oldest_key_age_steps"] == oldest
    assert r["oldest_key_age_epochs"] == pytest.approx(oldest / 50)
    assert r["full_batches"] == K // B and r["partial_keys"] == K % B
    # oracle: simulate a FIFO queue of key ages
    queue = []
    for _ in range(oldest + 3):
        queue = [a + 1 for a in queue] + [1] * B  # every key ages one step, a new batch arrives
        queue = queue[-K:] if len(queue) > K else queue
    assert sorted(r["ages"].tolist()) == sorted(queue)
    assert max(queue) == oldest
    assert r["mean_key_age_steps"] == pytest.approx(np.mean(queue))
    assert r["key_encoder_replaced"] == pytest.approx(1 - 0.99**oldest)


def test_queue_staleness_defaults_and_bad_input():
    r = W.queue_staleness(4096, 256)
    assert r["oldest_key_age_epochs"] is None and r["key_encoder_replaced"] is None
    with pytest.raises(ValueError, match="K must be an integer >= 1"):
        W.queue_staleness(0, 256)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        W.queue_staleness(4096, 2.5)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        W.queue_staleness(4096, 256, steps_per_epoch=0)
    with pytest.raises(ValueError, match="m must be in"):
        W.queue_staleness(4096, 256, m=-0.1)


# --------------------------------------------------------------------------- widgets, headless
def _text(box):
    return "".join(o.get("text", "") for o in box.output.outputs if o["output_type"] == "stream")


def _has_png(box):
    return any("image/png" in o.get("data", {}) for o in box.output.outputs)


def test_temperature_explorer_updates_output():
    ipywidgets = pytest.importorskip("ipywidgets")
    box = W.temperature_explorer(T=0.1)
    assert isinstance(box, ipywidgets.VBox)
    assert isinstance(box.controls["T"], ipywidgets.FloatLogSlider)
    first = _text(box)
    assert first.startswith("T = 0.100  entropy = ") and "loss = " in first and _has_png(box)
    box.controls["T"].value = 1.0
    assert _text(box).startswith("T = 1.000") and _text(box) != first
    # the printed loss is the one temperature_softmax computes
    sims = W.default_similarities()
    assert f"loss = {W.temperature_softmax(sims, 1.0)['loss']:.3f}" in _text(box)


def test_temperature_explorer_custom_similarities_and_bad_T():
    pytest.importorskip("ipywidgets")
    box = W.temperature_explorer(np.full(8, 0.2), T=0.5)
    assert f"loss = {math.log(8):.3f}" in _text(box)
    with pytest.raises(ValueError, match="T must be"):
        W.temperature_explorer(T=0.0)
    tiny = W.temperature_explorer(T=0.002)  # the slider widens to include T
    assert tiny.controls["T"].value == pytest.approx(0.002) and _text(tiny).startswith("T = 0.002")


def test_momentum_explorer_updates_output():
    pytest.importorskip("ipywidgets")
    box = W.momentum_explorer(m=0.99, steps=100)
    first = _text(box)
    assert first.startswith("m = 0.99") and _has_png(box)
    box.controls["m"].value = 0.9
    assert _text(box).startswith("m = 0.9 ")
    box.controls["target"].value = "step"
    assert _text(box) != first
    other = W.momentum_explorer(m=0.42, steps=50)  # a value not offered is added to the slider
    assert 0.42 in other.controls["m"].options and _text(other).startswith("m = 0.42 ")
    with pytest.raises(ValueError, match=r"m must be in \[0, 1\]"):
        W.momentum_explorer(m=1.5)


def test_queue_explorer_updates_output():
    pytest.importorskip("ipywidgets")
    box = W.queue_explorer(K=4096, batch_size=256)
    assert "oldest key = 16 steps" in _text(box) and _has_png(box)
    box.controls["K"].value = 1000
    box.controls["batch_size"].value = 128
    assert "oldest key = 8 steps" in _text(box)
    odd = W.queue_explorer(K=3000, batch_size=96, steps_per_epoch=None, m=None)
    assert _text(odd).startswith("K = 3000  batch = 96  oldest key = 32 steps  mean age")
    assert "epochs" not in _text(odd) and "moved" not in _text(odd)
    with pytest.raises(ValueError, match="K must be an integer >= 1"):
        W.queue_explorer(K=0)


def test_plot_helpers_do_not_touch_pyplot_or_rcparams():
    import matplotlib
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    rc = dict(matplotlib.rcParams)
    W.plot_temperature_softmax(W.temperature_softmax([0.5, 0.1, 0.0], 0.1))
    W.plot_ema_track(W.ema_track(0.9, 20))
    W.plot_queue_staleness(W.queue_staleness(100, 32))
    pytest.importorskip("ipywidgets")
    W.temperature_explorer().controls["T"].value = 0.5
    assert plt.get_fignums() == before
    assert dict(matplotlib.rcParams) == rc

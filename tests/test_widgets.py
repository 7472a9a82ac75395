"""Tests for mocolab.widgets: the explorers built headless (their maths: test_metrics, test_momentum, test_queue)."""
from __future__ import annotations

import math
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mocolab import widgets as W  # noqa: E402
from mocolab.metrics import default_similarities, temperature_softmax  # noqa: E402


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
    sims = default_similarities()
    assert f"loss = {temperature_softmax(sims, 1.0)['loss']:.3f}" in _text(box)


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
    with pytest.raises(ValueError, match="K must be a positive integer"):
        W.queue_explorer(K=0)


def test_explorers_do_not_touch_pyplot_or_rcparams():
    import matplotlib
    import matplotlib.pyplot as plt

    pytest.importorskip("ipywidgets")
    before, rc = plt.get_fignums(), dict(matplotlib.rcParams)
    W.temperature_explorer().controls["T"].value = 0.5
    W.queue_explorer().controls["K"].value = 1000
    assert plt.get_fignums() == before
    assert dict(matplotlib.rcParams) == rc

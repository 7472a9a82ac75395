"""Interactive explorers: temperature, momentum, queue staleness.

Letters: K queue size (negatives), m momentum, T temperature.

Each explorer wires ipywidgets sliders to a plain function that returns numbers
(:func:`~mocolab.metrics.temperature_softmax`, :func:`~mocolab.momentum.ema_track`,
:func:`~mocolab.queue.queue_staleness`; tests call them directly) and to the figure of
its result (:mod:`mocolab.plotting`), and shows both in an ``Output`` area: one text
line with the numbers, then the figure. ipywidgets is imported when a widget is built,
not at ``import mocolab``.

Figures are rendered to PNG with the Agg canvas (no pyplot, no global
style), so the explorers behave the same under any matplotlib backend.
"""
from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable
from typing import Any

from .metrics import default_similarities, temperature_softmax
from .momentum import TARGETS, check_momentum, ema_track
from .plotting import plot_ema_track, plot_queue_staleness, plot_temperature_softmax
from .queue import queue_staleness

__all__ = ["temperature_explorer", "momentum_explorer", "queue_explorer"]


def _png_output(fig) -> dict[str, Any]:
    """A Jupyter display_data output dict holding ``fig`` as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return {
        "output_type": "display_data",
        "data": {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"), "text/plain": "<Figure>"},
        "metadata": {},
    }


# =========================================================================== widgets
def _explorer(controls: dict[str, Any], render: Callable[..., tuple], title: str):
    """Wire ``controls`` (name -> widget) to ``render(**values) -> (text, fig)``.

    Returns a ``VBox`` [title, controls..., output] with attributes
    ``controls``, ``output`` and ``refresh()``. The output is replaced as a
    whole on every change (a text line, then the figure), so it also works
    without a running kernel (tests) and never flickers.
    """
    import ipywidgets as w

    out = w.Output(layout=w.Layout(min_height="120px"))

    def refresh(*_):
        values = {name: c.value for name, c in controls.items()}
        try:
            text, fig = render(**values)
            outputs = [{"output_type": "stream", "name": "stdout", "text": text + "\n"}]
            if fig is not None:
                outputs.append(_png_output(fig))
        except ValueError as err:  # a bad combination of values: say so, keep going
            outputs = [{"output_type": "stream", "name": "stderr", "text": f"{err}\n"}]
        out.outputs = tuple(outputs)

    for c in controls.values():
        c.observe(refresh, names="value")
    box = w.VBox([w.HTML(f"<b>{title}</b>"), *controls.values(), out])
    box.controls = controls
    box.output = out
    box.refresh = refresh
    refresh()
    return box


def temperature_explorer(similarities=None, T: float = 0.1, *, K: int = 16, seed: int = 0):
    """Slider over the temperature T of the InfoNCE softmax.

    Shows the softmax over one query's (K+1) similarities as bars (positive
    in green), and a line ``T = 0.100  entropy = ...  loss = ...``.

    Args:
        similarities: (K+1,) with the positive first; default
            :func:`default_similarities` (K negatives, seeded).
        T: initial temperature (slider from 0.01 to 10, log scale, widened
            to include T).
        K, seed: size and seed of the default similarities.

    Returns:
        an ``ipywidgets.VBox`` (display it as the last expression of a cell),
        with ``.controls["T"]`` the slider and ``.output`` the output area.

    Raises:
        ValueError: T <= 0 or bad similarities.
    """
    import ipywidgets as w

    sims = default_similarities(K, seed) if similarities is None else similarities
    temperature_softmax(sims, T)  # validate eagerly
    lo, hi = min(-2.0, math.floor(math.log10(T))), max(1.0, math.ceil(math.log10(T)))
    slider = w.FloatLogSlider(
        value=T, base=10, min=lo, max=hi, step=0.05, description="T", readout_format=".3f", continuous_update=True
    )

    def render(T):
        r = temperature_softmax(sims, T)
        text = (
            f"T = {T:.3f}  entropy = {r['entropy']:.3f} nats  loss = {r['loss']:.3f}  "
            f"p(positive) = {r['probs'][0]:.3f}  (chance loss ln(K+1) = {r['chance_loss']:.3f})"
        )
        return text, plot_temperature_softmax(r)

    return _explorer({"T": slider}, render, "Temperature of the InfoNCE softmax")


MOMENTA = (0.0, 0.5, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0)


def momentum_explorer(m: float = 0.99, steps: int = 300, *, target: str = "random_walk", seed: int = 0):
    """Slider over the momentum m of an EMA following a moving target.

    Args:
        m: initial momentum in [0, 1]; the slider offers 0, 0.5, 0.9, 0.95,
            0.99, 0.995, 0.999, 1 (and m).
        steps: steps simulated.
        target: "random_walk" or "step" (also a dropdown).
        seed: random-walk seed.

    Returns:
        an ``ipywidgets.VBox`` with ``.controls["m"]``, ``.controls["target"]``.

    Raises:
        ValueError: m outside [0, 1], or an unknown target.
    """
    import ipywidgets as w

    m = check_momentum(m)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    controls = {
        "m": w.SelectionSlider(options=sorted({*MOMENTA, m}), value=m, description="m"),
        "target": w.Dropdown(options=list(TARGETS), value=target, description="target"),
    }

    def render(m, target):
        r = ema_track(m, steps, target, seed=seed)
        tau = "inf" if math.isinf(r["time_constant"]) else f"{r['time_constant']:.0f}"
        text = (
            f"m = {m:g}  time constant 1/(1-m) = {tau} steps  mean lag = {r['lag']:.3f}  "
            f"mean drift per step = {r['mean_drift']:.4f}"
        )
        return text, plot_ema_track(r)

    return _explorer(controls, render, "Momentum m of the key encoder (EMA)")


QUEUE_SIZES = (256, 1000, 1024, 4096, 16384, 65536)
BATCH_SIZES = (32, 64, 100, 128, 256, 512)


def queue_explorer(
    K: int = 4096, batch_size: int = 256, steps_per_epoch: int | None = 196, m: float | None = 0.99
):
    """Sliders over queue size K and batch size: how stale are the keys?

    Args:
        K: initial queue size; the slider offers 256, 1000, 1024, 4096,
            16384, 65536 (and K).
        batch_size: initial batch size; the slider offers 32, 64, 100, 128,
            256, 512 (and batch_size).
        steps_per_epoch: steps in an epoch (CIFAR-10 at batch 256: 196), to
            express ages in epochs; None to leave out.
        m: key-encoder momentum, for the "key encoder moved" figure (None
            to leave out).

    Returns:
        an ``ipywidgets.VBox`` with ``.controls["K"]``, ``.controls["batch_size"]``.

    Raises:
        ValueError: K or batch_size < 1, steps_per_epoch < 1, m outside [0, 1].
    """
    import ipywidgets as w

    queue_staleness(K, batch_size, steps_per_epoch, m)  # validate eagerly
    controls = {
        "K": w.SelectionSlider(options=sorted({*QUEUE_SIZES, int(K)}), value=int(K), description="K"),
        "batch_size": w.SelectionSlider(
            options=sorted({*BATCH_SIZES, int(batch_size)}), value=int(batch_size), description="batch"
        ),
    }

    def render(K, batch_size):
        r = queue_staleness(K, batch_size, steps_per_epoch, m)
        epochs = "" if r["oldest_key_age_epochs"] is None else f" ({r['oldest_key_age_epochs']:.2f} epochs)"
        text = (
            f"K = {K}  batch = {batch_size}  oldest key = {r['oldest_key_age_steps']} steps{epochs}  "
            f"mean age = {r['mean_key_age_steps']:.1f} steps"
            + ("" if m is None else f"  key encoder moved since: {100 * r['key_encoder_replaced']:.1f}% (m = {m:g})")
        )
        return text, plot_queue_staleness(r)

    return _explorer(controls, render, "Queue size K: how old are the negatives?")

"""The widget exercise of notebook 02: predict, then check, the temperature that gives the positive half the mass."""

from __future__ import annotations

import math

from .core import is_headless

__all__ = ["temperature_for_mass", "half_mass_temperature"]


def temperature_for_mass(similarities, mass: float = 0.5) -> float:
    """The temperature T at which ``softmax(similarities / T)`` gives the positive (index 0) probability ``mass``.

    The positive's probability falls from 1 (T → 0) to 1 / (K + 1) (T → ∞) when the positive is the most
    similar candidate, so there is one such T; it is found by bisection on log T.

    Raises:
        ValueError: the positive is not strictly the largest similarity, or ``mass`` is outside (1 / (K + 1), 1).
    """
    from ..metrics import _as_1d, temperature_softmax

    s = _as_1d(similarities, "similarities")
    if s.shape[0] < 2 or not s[0] > s[1:].max():
        raise ValueError("the positive (index 0) must be strictly the most similar candidate")
    if not 1.0 / s.shape[0] < mass < 1.0:
        raise ValueError(f"mass must lie in (1 / (K + 1), 1) = ({1 / s.shape[0]:.4g}, 1), got {mass}")
    lo, hi = math.log(1e-6), math.log(1e6)  # p(positive) is above mass at lo, below it at hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if temperature_softmax(s, math.exp(mid))["probs"][0] > mass:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def _prediction_verdict(prediction, answer: float) -> tuple[str, float | None]:
    """A sentence on the learner's prediction, and the prediction as a temperature (None if it is not one)."""
    if prediction is None:
        return "You made no prediction yet.", None
    try:
        p = float(prediction)
    except (TypeError, ValueError):
        return f"Your prediction {prediction!r} is not a number.", None
    if not (p > 0 and math.isfinite(p)):
        return f"Your prediction T = {p:g} is not a temperature (T > 0).", None
    factor = max(p / answer, answer / p)
    verdict = "spot on" if factor < 1.15 else "close" if factor < 1.5 else f"off by a factor {factor:.1f}"
    return f"Your prediction, T = {p:.3g}, was {verdict}.", p


def half_mass_temperature(prediction=None, similarities=None, *, K: int = 16, seed: int = 0, mass: float = 0.5,
                          tolerance: float = 0.02):
    """Predict, then check with a slider: the temperature at which the positive gets half the softmax mass.

    Interactive: a slider over T, the bars of the softmax (positive in green) and a line that says whether the
    positive's probability is above or below ``mass``; within ``tolerance`` of it the line reveals the answer
    and compares it with ``prediction``. Headless (see :func:`is_headless`): prints the check and returns None.

    Args:
        prediction: the learner's guess of T (None: no guess yet).
        similarities: (K + 1,) cosines, positive first; default
            :func:`mocolab.metrics.default_similarities` (K negatives, ``seed``).
        mass: the positive's probability to reach (default ½).

    Returns:
        the widget (an ``ipywidgets.VBox`` with ``.controls["T"]`` and ``.output``), or None headless.
    """
    from ..metrics import _as_1d, default_similarities, temperature_softmax
    from ..plotting import plot_temperature_softmax
    from ..widgets import _explorer

    sims = default_similarities(K, seed) if similarities is None else _as_1d(similarities, "similarities")
    answer = temperature_for_mass(sims, mass)
    verdict, guess = _prediction_verdict(prediction, answer)
    if is_headless():
        at_guess = ""
        if guess is not None:
            at_guess = f" At your T, p(positive) = {temperature_softmax(sims, guess)['probs'][0]:.3f}."
        print(f"Predict, then check (headless run, no slider): the softmax over these {len(sims)} similarities "
              f"puts {mass:g} of its mass on the positive at T = {answer:.3g}. {verdict}{at_guess}", flush=True)
        return None

    import ipywidgets as w

    start = guess if guess is not None else 1.0
    lo, hi = min(-2.0, math.floor(math.log10(start))), max(1.0, math.ceil(math.log10(start)))
    slider = w.FloatLogSlider(value=start, base=10, min=lo, max=hi, step=0.005, description="T",
                              readout_format=".3f", continuous_update=True)

    def render(T):
        r = temperature_softmax(sims, T)
        p = r["probs"][0]
        if abs(p - mass) <= tolerance:
            text = (f"✓ T = {T:.3f}: p(positive) = {p:.3f}, about {mass:g}. The exact value is T = {answer:.3f}. "
                    f"{verdict}")
        elif p > mass:
            text = f"T = {T:.3f}: p(positive) = {p:.3f}, more than {mass:g}: raise T to flatten the softmax."
        else:
            text = f"T = {T:.3f}: p(positive) = {p:.3f}, less than {mass:g}: lower T to sharpen the softmax."
        return text, plot_temperature_softmax(r)

    return _explorer({"T": slider}, render, f"Find the T at which the positive gets {mass:g} of the mass")

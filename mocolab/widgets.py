"""Interactive explorers: temperature, momentum, queue staleness.

Letters: K queue size (negatives), m momentum, T temperature.

Each explorer is two layers. The maths is a plain function that returns
numbers (:func:`temperature_softmax`, :func:`ema_track`,
:func:`queue_staleness`); tests call it directly. The widget
(:func:`temperature_explorer`, :func:`momentum_explorer`,
:func:`queue_explorer`) only wires ipywidgets sliders to that function and
shows its result in an ``Output`` area: one text line with the numbers, then
a figure. ipywidgets is imported when a widget is built, not at
``import mocolab``.

Figures are rendered to PNG with the Agg canvas (no pyplot, no global
style), so the explorers behave the same under any matplotlib backend.
"""
from __future__ import annotations

import base64
import io
import math
from typing import Any, Callable, Dict, Optional, Sequence, Union

import numpy as np

__all__ = [
    "temperature_softmax",
    "ema_track",
    "queue_staleness",
    "temperature_explorer",
    "momentum_explorer",
    "queue_explorer",
    "plot_temperature_softmax",
    "plot_ema_track",
    "plot_queue_staleness",
    "default_similarities",
]


# =========================================================================== maths
def temperature_softmax(similarities, T: float) -> Dict[str, Any]:
    """The InfoNCE softmax over one query's similarities at temperature T.

    ``probs = softmax(similarities / T)``; the loss is the InfoNCE /
    cross-entropy loss with the positive at index 0 (Oord et al. 2018; He et
    al. 2020, Eq. 1). A small T sharpens the distribution onto the largest
    similarity (the hardest negatives dominate the gradient); a large T
    flattens it towards uniform (entropy ln(K+1)).

    Args:
        similarities: (K+1,) cosine similarities, the positive q.k first,
            then the K negatives q.queue.
        T: temperature, > 0.

    Returns:
        dict with ``probs`` (K+1,) numpy, ``entropy`` (nats), ``loss``
        (= -log probs[0]), ``chance_loss`` (= ln(K+1), the loss when all
        similarities are equal) and ``T``.

    Shape:
        similarities: (K+1,) -> probs: (K+1,)

    Raises:
        ValueError: T <= 0 or not finite, or fewer than 2 similarities.
    """
    if not (isinstance(T, (int, float, np.floating)) and math.isfinite(T) and T > 0):
        raise ValueError(f"T must be a finite number > 0, got {T!r}")
    s = _as_1d(similarities, "similarities")
    if s.shape[0] < 2:
        raise ValueError(f"similarities must hold the positive and at least one negative, got {s.shape[0]}")
    z = s / T  # (K+1,) logits
    z = z - z.max()
    log_probs = z - np.log(np.exp(z).sum())  # (K+1,)
    probs = np.exp(log_probs)
    entropy = float(-(probs * log_probs).sum())
    return {
        "probs": probs,
        "entropy": entropy,
        "loss": float(-log_probs[0]),
        "chance_loss": math.log(s.shape[0]),
        "T": float(T),
    }


def _as_1d(x, name: str) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite")
    return x


def _check_momentum(m: float) -> float:
    if not (isinstance(m, (int, float, np.floating)) and 0.0 <= m <= 1.0):
        raise ValueError(f"m must be in [0, 1], got {m!r}")
    return float(m)


TARGETS = ("random_walk", "step")


def _make_target(target, steps: int, seed: int, step_at: Optional[int]) -> np.ndarray:
    if callable(target):
        values = np.asarray([target(t) for t in range(steps)], dtype=np.float64)
    elif isinstance(target, str):
        if target == "random_walk":
            rng = np.random.default_rng(seed)
            values = np.cumsum(rng.standard_normal(steps)) * 0.1
            values -= values[0]
        elif target == "step":
            at = steps // 4 if step_at is None else step_at
            values = (np.arange(steps) >= at).astype(np.float64)
        else:
            raise ValueError(f"target must be one of {TARGETS}, a callable or an array, got {target!r}")
    else:
        values = np.asarray(target, dtype=np.float64)
        if values.shape[0] != steps:
            raise ValueError(f"a target array must have steps={steps} rows, got {values.shape[0]}")
    if values.ndim not in (1, 2):
        raise ValueError(f"target values must be scalars or vectors, got shape {values.shape[1:]}")
    return values


def ema_track(
    m: float,
    steps: int = 300,
    target: Union[str, Callable[[int], Any], Sequence] = "random_walk",
    *,
    seed: int = 0,
    step_at: Optional[int] = None,
) -> Dict[str, Any]:
    """How an exponential moving average with momentum m follows a target.

    This is the key encoder of MoCo (He et al. 2020, Eq. 2):
    ``theta_k <- m * theta_k + (1 - m) * theta_q``, with the query encoder
    ``theta_q`` as a moving target. ``ema[0] = target[0]`` (the key encoder
    starts as a copy), then ``ema[t] = m * ema[t-1] + (1 - m) * target[t]``.
    m = 0 copies the target at every step; m = 1 never moves. The key
    drift per step is ``|ema[t] - ema[t-1]| = (1 - m) * |target[t] -
    ema[t-1]|``: a large m keeps successive keys consistent, at the price of
    lagging behind the query encoder by about 1 / (1 - m) steps.

    Args:
        m: momentum in [0, 1].
        steps: number of steps, >= 2.
        target: "random_walk" (seeded Gaussian random walk), "step" (0 then
            1 from ``step_at``, default steps // 4), a callable ``t -> value``
            or an array of ``steps`` values (scalars or vectors).
        seed: random-walk seed.
        step_at: step of the jump for ``target="step"``.

    Returns:
        dict with ``target`` and ``ema`` (steps,) or (steps, D) arrays,
        ``error`` (steps,) = |target - ema|, ``lag`` = mean error,
        ``drift`` (steps,) = |ema[t] - ema[t-1]| (drift[0] = 0),
        ``mean_drift``, ``time_constant`` = 1 / (1 - m) (inf for m = 1),
        ``half_life`` = steps for a gap to halve (ln 0.5 / ln m), and ``m``.

    Shape:
        target: (steps,) or (steps, D)

    Raises:
        ValueError: m outside [0, 1], steps < 2, or an unknown target.
    """
    m = _check_momentum(m)
    if int(steps) != steps or steps < 2:
        raise ValueError(f"steps must be an integer >= 2, got {steps!r}")
    steps = int(steps)
    tgt = _make_target(target, steps, seed, step_at)  # (steps,) or (steps, D)
    ema = np.empty_like(tgt)
    ema[0] = tgt[0]
    for t in range(1, steps):
        ema[t] = m * ema[t - 1] + (1.0 - m) * tgt[t]

    def norm(x):
        return np.abs(x) if x.ndim == 1 else np.linalg.norm(x, axis=-1)

    error = norm(tgt - ema)  # (steps,)
    drift = np.zeros(steps)
    drift[1:] = norm(np.diff(ema, axis=0))
    if m == 1.0:
        half_life, tau = math.inf, math.inf
    elif m == 0.0:
        half_life, tau = 0.0, 1.0
    else:
        half_life, tau = math.log(0.5) / math.log(m), 1.0 / (1.0 - m)
    return {
        "m": m,
        "target": tgt,
        "ema": ema,
        "error": error,
        "lag": float(error.mean()),
        "drift": drift,
        "mean_drift": float(drift[1:].mean()),
        "time_constant": tau,
        "half_life": half_life,
    }


def queue_staleness(
    K: int,
    batch_size: int,
    steps_per_epoch: Optional[int] = None,
    m: Optional[float] = None,
) -> Dict[str, Any]:
    """How old the keys in a full MoCo queue are.

    Each step enqueues the ``batch_size`` newest keys and drops the oldest
    (He et al. 2020, Sec. 3.2). When the queue is used at a step, its
    newest keys are 1 step old and the oldest were produced
    ``ceil(K / batch_size)`` steps ago; when the batch does not divide K the
    oldest batch is only partly left. Those keys come from as many different
    versions of the key encoder.

    Args:
        K: queue size, >= 1.
        batch_size: keys enqueued per step, >= 1.
        steps_per_epoch: steps in one epoch, to express ages in epochs.
        m: key-encoder momentum in [0, 1], to say how much the key encoder
            has moved since the oldest key was made.

    Returns:
        dict with ``oldest_key_age_steps`` = ceil(K / batch_size),
        ``oldest_key_age_epochs`` (None without ``steps_per_epoch``),
        ``mean_key_age_steps``, ``ages`` (K,) integer age of every key,
        ``full_batches`` = K // batch_size, ``partial_keys`` = K % batch_size,
        ``encoder_versions`` (= oldest age), and ``key_encoder_replaced`` =
        1 - m ** oldest age (the weight of key-encoder updates made since the
        oldest key; None without ``m``).

    Raises:
        ValueError: K or batch_size < 1, or steps_per_epoch < 1.
    """
    for name, v in (("K", K), ("batch_size", batch_size)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if steps_per_epoch is not None and (not isinstance(steps_per_epoch, (int, np.integer)) or steps_per_epoch < 1):
        raise ValueError(f"steps_per_epoch must be an integer >= 1 or None, got {steps_per_epoch!r}")
    if m is not None:
        m = _check_momentum(m)
    K, B = int(K), int(batch_size)
    full, partial = divmod(K, B)
    oldest = -(-K // B)  # ceil(K / B)
    ages = np.repeat(np.arange(1, full + 1), B)  # (full * B,)
    if partial:
        ages = np.concatenate([ages, np.full(partial, full + 1)])  # (K,)
    mean_age = (B * full * (full + 1) / 2 + partial * (full + 1)) / K
    return {
        "K": K,
        "batch_size": B,
        "oldest_key_age_steps": oldest,
        "oldest_key_age_epochs": None if steps_per_epoch is None else oldest / steps_per_epoch,
        "mean_key_age_steps": mean_age,
        "ages": ages,
        "full_batches": full,
        "partial_keys": partial,
        "encoder_versions": oldest,
        "key_encoder_replaced": None if m is None else 1.0 - m**oldest,
    }


# =========================================================================== figures
def _new_figure(figsize):
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots()


def plot_temperature_softmax(result: Dict[str, Any], ax=None):
    """Bar plot of :func:`temperature_softmax` probabilities (positive in green)."""
    if ax is None:
        fig, ax = _new_figure((6.0, 2.8))
    else:
        fig = ax.figure
    p = result["probs"]
    colors = ["tab:green"] + ["tab:red"] * (len(p) - 1)
    ax.bar(np.arange(len(p)), p, color=colors)
    ax.axhline(1.0 / len(p), color="gray", linestyle=":", linewidth=1, label="uniform 1/(K+1)")
    ax.set_ylim(0, 1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("index (0 = positive, 1..K = negatives)")
    ax.set_ylabel("softmax probability")
    ax.set_title(f"T = {result['T']:.3g}: loss {result['loss']:.3f}, entropy {result['entropy']:.3f} nats")
    ax.legend(fontsize="small", frameon=False, loc="upper right")
    return fig


def plot_ema_track(result: Dict[str, Any], axes=None):
    """Target vs EMA (top) and key drift per step (bottom) from :func:`ema_track`."""
    if axes is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.5, 4.0), layout="constrained")
        axes = fig.subplots(2, 1, sharex=True)
    else:
        fig = axes[0].figure
    tgt, ema = result["target"], result["ema"]
    if tgt.ndim == 2:  # vectors: show the first coordinate
        tgt, ema = tgt[:, 0], ema[:, 0]
    t = np.arange(len(tgt))
    axes[0].plot(t, tgt, color="tab:blue", label="target (query encoder θq)")
    axes[0].plot(t, ema, color="tab:orange", label=f"EMA (key encoder θk), m = {result['m']:g}")
    axes[0].legend(fontsize="small", frameon=False)
    axes[0].set_ylabel("value")
    axes[1].plot(t, result["drift"], color="tab:orange")
    axes[1].set_ylabel("drift per step")
    axes[1].set_xlabel("step")
    return fig


def plot_queue_staleness(result: Dict[str, Any], ax=None):
    """Number of keys of each age in the queue, from :func:`queue_staleness`."""
    if ax is None:
        fig, ax = _new_figure((6.0, 2.8))
    else:
        fig = ax.figure
    ages, counts = np.unique(result["ages"], return_counts=True)
    ax.bar(ages, counts, width=0.9 if len(ages) < 60 else 1.0, color="tab:purple")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("key age (steps since it was enqueued)")
    ax.set_ylabel("keys in the queue")
    ax.set_title(
        f"K = {result['K']}, batch = {result['batch_size']}: oldest key {result['oldest_key_age_steps']} steps"
    )
    return fig


def _png_output(fig) -> Dict[str, Any]:
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
def _explorer(controls: Dict[str, Any], render: Callable[..., tuple], title: str):
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


def default_similarities(K: int = 16, seed: int = 0, positive: float = 0.6) -> np.ndarray:
    """A plausible (K+1,) similarity vector: positive first, negatives ~ N(0, 0.25)."""
    rng = np.random.default_rng(seed)
    neg = np.clip(rng.normal(0.0, 0.25, size=K), -1.0, 1.0)
    return np.concatenate([[positive], neg])


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

    sims = default_similarities(K, seed) if similarities is None else _as_1d(similarities, "similarities")
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

    m = _check_momentum(m)
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
    K: int = 4096, batch_size: int = 256, steps_per_epoch: Optional[int] = 196, m: Optional[float] = 0.99
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

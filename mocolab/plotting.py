"""Figures of training: curves, sweeps, similarity histograms, and the explorers' plots.

Letters: N samples, K queue size (negatives), m momentum, T temperature.

Every plot function takes ``ax=None`` (or ``axes=None``), draws onto the
given axes or onto a new figure, and returns the figure. Nothing here calls
``plt.show()`` or touches global style (``rcParams``): in a notebook the
returned figure is displayed; in a script, save it with
``fig.savefig(path)``. New figures are made with ``matplotlib.figure.Figure``
(not pyplot), so they are never left open in pyplot's figure registry.
Nothing here computes what it shows: the numbers come from :mod:`mocolab.metrics`,
:mod:`mocolab.momentum` and :mod:`mocolab.queue`; pictures of samples are in :mod:`mocolab.gallery`.

Functions:
    plot_curves: loss / kNN accuracy / alignment / uniformity against epoch.
    plot_sweep: a metric against a swept hyper-parameter (e.g. momentum m),
        with optional published reference points.
    plot_similarity_histograms: positive vs negative cosine similarities
        (q.k vs q.queue, e.g. from :func:`~mocolab.metrics.similarity_stats`) at several moments of training.
    plot_temperature_softmax, plot_ema_track, plot_queue_staleness: the results of
        :func:`~mocolab.metrics.temperature_softmax`, :func:`~mocolab.momentum.ema_track` and
        :func:`~mocolab.queue.queue_staleness` (the explorers of :mod:`mocolab.widgets`).

matplotlib is imported when a function is called, not at ``import mocolab``.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "plot_similarity_histograms",
    "plot_curves",
    "plot_sweep",
    "plot_temperature_softmax",
    "plot_ema_track",
    "plot_queue_staleness",
    "save_figure",
]

POS_COLOR = "tab:green"
NEG_COLOR = "tab:red"
REF_COLOR = "tab:gray"


# --------------------------------------------------------------------------- helpers
def save_figure(fig, path, axes=()):
    """Grid the ``axes``, lay ``fig`` out tightly and save it to ``path`` (100 dpi); returns ``fig``."""
    for ax in np.ravel(axes):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig


def _to_numpy(x: Any, dtype=None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16 or x.dtype == torch.float16:
            x = x.float()
        x = x.numpy()
    x = np.asarray(x)
    return x.astype(dtype) if dtype is not None else x


def _new_figure(nrows: int = 1, ncols: int = 1, figsize=None, squeeze: bool = True, **kw):
    """A figure that is not registered with pyplot (no global state)."""
    from matplotlib.figure import Figure

    if figsize is None:
        figsize = (4.0 * ncols, 3.2 * nrows)
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=squeeze, **kw)
    return fig, axes


def _figure_for(ax, figsize):
    """``(figure, axes)``: ``ax`` and its figure, or a new figure of ``figsize`` with one axes when ``ax`` is None."""
    return _new_figure(figsize=figsize) if ax is None else (ax.figure, ax)


def _axes_list(axes, n: int, name: str = "axes") -> list:
    flat = list(np.ravel(np.asarray(axes, dtype=object))) if not hasattr(axes, "plot") else [axes]
    if len(flat) < n:
        raise ValueError(f"{name} must hold at least {n} axes (one per panel), got {len(flat)}")
    return flat


# --------------------------------------------------------------------------- similarities
def plot_similarity_histograms(
    snapshots: Mapping | Sequence[Mapping],
    axes=None,
    *,
    bins: int = 50,
    sharey: bool = False,
):
    """Histograms of positive vs negative cosine similarities, one panel each.

    A positive similarity is q.k of the two views of one image; a negative
    one is q.queue (q against the queued keys of other images). Training
    pushes the first towards 1 while keeping the second spread near 0.

    Args:
        snapshots: a dict or a list of dicts, each with ``"pos"`` (1-D
            positive similarities), ``"neg"`` (1-D negative similarities)
            and a ``"title"`` or an ``"epoch"``.
        axes: a sequence of at least ``len(snapshots)`` axes; a new figure
            (one row) when None.
        bins: histogram bins over [-1, 1].
        sharey: share the density axis between panels (new figure only).

    Returns:
        The matplotlib figure.

    Shape:
        pos: (P,), neg: (Q,) per snapshot (any sizes).

    Raises:
        ValueError: an empty list, or a snapshot without "pos" / "neg".
    """
    if isinstance(snapshots, Mapping):
        snapshots = [snapshots]
    snapshots = list(snapshots)
    if not snapshots:
        raise ValueError("snapshots must hold at least one dict with 'pos' and 'neg'")
    n = len(snapshots)
    if axes is None:
        fig, axes = _new_figure(1, n, figsize=(3.6 * n, 3.0), squeeze=False, sharex=True, sharey=sharey)
        axes = list(axes.ravel())
    else:
        axes = _axes_list(axes, n)
        fig = axes[0].figure
    edges = np.linspace(-1.0, 1.0, bins + 1)
    for i, (snap, ax) in enumerate(zip(snapshots, axes)):
        if "pos" not in snap or "neg" not in snap:
            raise ValueError(f"snapshot {i} must have keys 'pos' and 'neg', got {sorted(snap)}")
        for key, color, name, y_text in (
            ("neg", NEG_COLOR, "negatives q·queue", 0.88),
            ("pos", POS_COLOR, "positives q·k", 1.0),
        ):
            v = _to_numpy(snap[key], np.float64).ravel()
            v = v[np.isfinite(v)]
            if v.size == 0:
                continue
            ax.hist(np.clip(v, -1, 1), bins=edges, density=True, alpha=0.55, color=color, label=name)
            mean = float(v.mean())
            ax.axvline(mean, color=color, linestyle="--", linewidth=1.5)
            ax.annotate(
                f"{mean:+.2f}",
                xy=(mean, y_text),
                xycoords=("data", "axes fraction"),
                xytext=(2, -2),
                textcoords="offset points",
                va="top",
                fontsize="small",
                color=color,
            )
        if "title" in snap:
            ax.set_title(str(snap["title"]))
        elif "epoch" in snap:
            ax.set_title(f"epoch {snap['epoch']}")
        ax.set_xlim(-1.0, 1.0)
        ax.set_xlabel("cosine similarity")
        if i == 0:
            ax.set_ylabel("density")
            ax.legend(loc="upper left", fontsize="x-small", frameon=False)
    return fig


# --------------------------------------------------------------------------- curves
_X_KEYS = ("epoch", "step", "epochs", "steps")


def plot_curves(
    history: Mapping[str, Sequence], keys: Sequence[str] | None = None, axes=None, *, ncols: int = 4
):
    """Training curves, one panel per metric.

    Args:
        history: dict of lists, e.g. ``{"epoch": [1, 2], "loss": [...],
            "knn_acc": [...]}``. The x values are ``history["epoch"]`` (or
            ``"step"``) when present and as long as the metric, except
            that a metric's own x list wins: ``history[key + "_epoch"]``,
            or for ``"knn_acc"`` also ``history["knn_epoch"]`` (metrics
            evaluated only every few epochs); else 1, 2, 3, ...
            None / NaN entries are skipped (the line joins the points around).
        keys: metrics to plot; default: every numeric list except the x keys.
        axes: a sequence of at least ``len(keys)`` axes; a new figure when
            None.
        ncols: panels per row of a new figure.

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: no metric to plot or a key not in history.
    """
    if keys is None:
        keys = [
            k
            for k, v in history.items()
            if k not in _X_KEYS
            and not k.endswith(("_epoch", "_step"))
            and isinstance(v, (list, tuple, np.ndarray, torch.Tensor))
            and len(v) > 0
            and all(x is None or isinstance(x, numbers.Number) or np.ndim(x) == 0 for x in v)
        ]
    else:
        keys = [keys] if isinstance(keys, str) else list(keys)
        missing = [k for k in keys if k not in history]
        if missing:
            raise ValueError(f"keys {missing} not in history; available: {sorted(history)}")
    if not keys:
        raise ValueError(f"nothing to plot: history has no numeric lists besides {_X_KEYS}")
    n = len(keys)
    if axes is None:
        cols = max(1, min(n, ncols))
        rows = math.ceil(n / cols)
        fig, axes = _new_figure(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
        axes = list(axes.ravel())
        for ax in axes[n:]:
            ax.remove()
    else:
        axes = _axes_list(axes, n)
        fig = axes[0].figure
    for key, ax in zip(keys, axes):
        y = [np.nan if v is None else float(v) for v in _to_numpy(history[key], object).ravel()]
        x, xlabel = None, "index"
        # own x first ("knn_acc_epoch" or "knn_epoch" for "knn_acc"), then the shared "epoch" / "step"
        prefix = key.split("_")[0]
        own = [f"{key}_epoch", f"{key}_step", f"{prefix}_epoch", f"{prefix}_step"]
        for xk in own + list(_X_KEYS[:2]):
            if xk in history and xk != key and len(history[xk]) == len(y):
                x, xlabel = list(history[xk]), xk.rsplit("_", 1)[-1]
                break
        if x is None:
            x = list(range(1, len(y) + 1))
            if key.startswith("step_") or key.endswith("_step"):
                xlabel = "step"
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        ok = np.isfinite(y)
        ax.plot(x[ok], y[ok], marker="o" if ok.sum() <= 30 else None, markersize=3)
        if np.all(x == np.round(x)):
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(key)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    return fig


# --------------------------------------------------------------------------- sweeps
def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def plot_sweep(
    values: Mapping[Any, Any],
    xlabel: str,
    ylabel: str,
    ax=None,
    reference: Mapping[Any, float] | tuple[str, Mapping[Any, float]] | None = None,
    *,
    reference_label: str = "paper",
    categorical: bool | None = None,
    xscale: str | None = None,
    label: str = "this notebook",
    title: str | None = None,
):
    """A measured metric against a swept hyper-parameter.

    Args:
        values: ``{x: y}``, e.g. ``{0.0: 31.2, 0.9: 45.0, 0.99: 52.3}``; a
            y may be a list of repeats (seeds), drawn as mean +- std.
        xlabel, ylabel: axis labels.
        ax: axes to draw on; a new figure when None.
        reference: published numbers to compare with, ``{x: y}`` or
            ``(label, {x: y})``; drawn as hollow grey squares with a dashed
            line, labelled "published (label)". They come from a different
            setting (dataset, model, epochs): compare trends, not levels.
        reference_label: label when ``reference`` is a plain dict.
        categorical: place x values at equal spacing with their values as
            tick labels (default: when any x is not a number). Useful for
            momenta such as 0, 0.9, 0.99, 0.999.
        xscale: e.g. "log" for numeric sweeps such as K.
        label: legend label of the measured values.
        title: axes title.

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: empty ``values``.
    """
    if not values:
        raise ValueError("values must map at least one swept value to a metric")
    if isinstance(reference, tuple):
        reference_label, reference = reference
    xs = list(values)
    all_x = xs + [x for x in (reference or {}) if x not in values]
    if categorical is None:
        categorical = not all(_is_number(x) for x in all_x)
    if categorical:
        order = xs + [x for x in all_x if x not in xs]
        pos = {x: i for i, x in enumerate(order)}
    else:
        order = sorted(all_x)
        pos = {x: float(x) for x in all_x}
        xs = sorted(xs)
    fig, ax = _figure_for(ax, (5.0, 3.6))
    means, stds = [], []
    for x in xs:
        y = _to_numpy(values[x], np.float64).ravel()
        means.append(float(np.mean(y)))
        stds.append(float(np.std(y)) if y.size > 1 else 0.0)
    px = [pos[x] for x in xs]
    if any(s > 0 for s in stds):
        ax.errorbar(px, means, yerr=stds, marker="o", capsize=3, label=label, color="tab:blue")
    else:
        ax.plot(px, means, marker="o", label=label, color="tab:blue")
    if reference:
        rx = [x for x in order if x in reference]
        ax.plot(
            [pos[x] for x in rx],
            [float(reference[x]) for x in rx],
            linestyle="--",
            marker="s",
            markerfacecolor="none",
            color=REF_COLOR,
            label=f"published ({reference_label})",
        )
    if categorical:
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([str(x) for x in order])
    elif xscale is not None:
        ax.set_xscale(xscale)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if reference or label:
        ax.legend(fontsize="small", frameon=False)
    if title is not None:
        ax.set_title(title)
    return fig


# --------------------------------------------------------------------------- explorers
def plot_temperature_softmax(result: Mapping[str, Any], ax=None):
    """Bar plot of :func:`temperature_softmax` probabilities (positive in green)."""
    fig, ax = _figure_for(ax, (6.0, 2.8))
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


def plot_ema_track(result: Mapping[str, Any], axes=None):
    """Target vs EMA (top) and key drift per step (bottom) from :func:`ema_track`."""
    if axes is None:
        fig, axes = _new_figure(2, 1, figsize=(6.5, 4.0), sharex=True)
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


def plot_queue_staleness(result: Mapping[str, Any], ax=None):
    """Number of keys of each age in the queue, from :func:`queue_staleness`."""
    fig, ax = _figure_for(ax, (6.0, 2.8))
    ages, counts = np.unique(result["ages"], return_counts=True)
    ax.bar(ages, counts, width=0.9 if len(ages) < 60 else 1.0, color="tab:purple")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("key age (steps since it was enqueued)")
    ax.set_ylabel("keys in the queue")
    ax.set_title(
        f"K = {result['K']}, batch = {result['batch_size']}: oldest key {result['oldest_key_age_steps']} steps"
    )
    return fig

"""Figures for looking inside a contrastive model.

Letters: N samples, C feature dim, M keys in a bank or queue, k neighbours.

Every plot function takes ``ax=None`` (or ``axes=None``), draws onto the
given axes or onto a new figure, and returns the figure. Nothing here calls
``plt.show()`` or touches global style (``rcParams``): in a notebook the
returned figure is displayed; in a script, save it with
``fig.savefig(path)``. New figures are made with ``matplotlib.figure.Figure``
(not pyplot), so they are never left open in pyplot's figure registry.

Functions:
    embed_2d / plot_embedding: UMAP (or PCA) of feature vectors, coloured by
        class (notebook 09).
    plot_similarity_histograms: positive vs negative cosine similarities
        (q.k vs q.queue) at several moments of training.
    plot_curves: loss / kNN accuracy / alignment / uniformity against epoch.
    plot_image_grid, nearest_and_hardest, plot_neighbours: image galleries of
        a query's nearest keys and its hardest negatives.
    plot_sweep: a metric against a swept hyper-parameter (e.g. momentum m),
        with optional published reference points.

matplotlib is imported when a function is called, not at ``import mocolab``.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "embed_2d",
    "plot_embedding",
    "plot_similarity_histograms",
    "plot_curves",
    "plot_image_grid",
    "nearest_and_hardest",
    "Neighbours",
    "plot_neighbours",
    "plot_sweep",
]

EMBED_METHODS = ("umap", "pca")
POS_COLOR = "tab:green"
NEG_COLOR = "tab:red"
REF_COLOR = "tab:gray"


# --------------------------------------------------------------------------- helpers
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


def _axes_list(axes, n: int, name: str = "axes") -> list:
    flat = list(np.ravel(np.asarray(axes, dtype=object))) if not hasattr(axes, "plot") else [axes]
    if len(flat) < n:
        raise ValueError(f"{name} must hold at least {n} axes (one per panel), got {len(flat)}")
    return flat


# --------------------------------------------------------------------------- embeddings
def _pca_2d(x: np.ndarray) -> np.ndarray:
    """Project onto the top two principal components (deterministic signs)."""
    x = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = vt[:2]  # (2, C)
    # fix the sign ambiguity of the SVD: largest-magnitude loading is positive
    signs = np.sign(comps[np.arange(comps.shape[0]), np.abs(comps).argmax(axis=1)])
    signs[signs == 0] = 1.0
    out = x @ (comps * signs[:, None]).T  # (N, 2) or (N, 1)
    if out.shape[1] < 2:  # a single feature dimension: pad with zeros
        out = np.concatenate([out, np.zeros((out.shape[0], 2 - out.shape[1]))], axis=1)
    return out


def embed_2d(
    features,
    method: str = "umap",
    seed: int = 0,
    *,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str = "cosine",
    return_method: bool = False,
) -> Union[np.ndarray, Tuple[np.ndarray, str]]:
    """Embed feature vectors in 2-D for plotting.

    UMAP (McInnes et al. 2018, umap-learn) is imported lazily. When
    umap-learn is not installed, or there are too few points for it, this
    falls back to PCA and says so with a warning; pass
    ``return_method=True`` to also get the name of the method that was used.

    The first UMAP fit in a Python process compiles numba code (tens of
    seconds on a laptop CPU). Compute the embedding once and pass the (N, 2)
    result to :func:`plot_embedding` as many times as needed.

    Args:
        features: (N, C) tensor or array (need not be normalised).
        method: "umap" or "pca".
        seed: random state for UMAP (PCA is deterministic).
        n_neighbors, min_dist, metric: UMAP settings (n_neighbors is capped
            at N - 1).
        return_method: also return the method actually used.

    Returns:
        (N, 2) float numpy array, or ``(array, method_used)``.

    Shape:
        features: (N, C) -> (N, 2)

    Raises:
        ValueError: unknown method, or features not 2-D / empty.
    """
    if method not in EMBED_METHODS:
        raise ValueError(f"method must be one of {EMBED_METHODS}, got {method!r}")
    x = _to_numpy(features, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (N, C) array, got shape {tuple(x.shape)}")
    n = x.shape[0]
    used = method
    if method == "umap":
        reason = None
        if n < 5:
            reason = f"only {n} points (UMAP needs at least 5)"
        else:
            try:
                import umap  # noqa: F401  (slow import: numba)
            except ImportError:
                reason = "umap-learn is not installed (pip install umap-learn)"
        if reason is not None:
            warnings.warn(f"embed_2d: {reason}; falling back to PCA", stacklevel=2)
            used = "pca"
        else:
            with warnings.catch_warnings():
                # "n_jobs overridden by random_state": expected, we want reproducibility
                warnings.filterwarnings("ignore", message=".*n_jobs.*", category=UserWarning)
                reducer = umap.UMAP(
                    n_components=2,
                    n_neighbors=max(2, min(n_neighbors, n - 1)),
                    min_dist=min_dist,
                    metric=metric,
                    random_state=seed,
                )
                out = np.asarray(reducer.fit_transform(x), dtype=np.float64)  # (N, 2)
    if used == "pca":
        out = _pca_2d(x)  # (N, 2)
    return (out, used) if return_method else out


def _class_colors(num: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if num <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(num)]


def plot_embedding(
    features_or_2d,
    labels=None,
    classes: Optional[Sequence[str]] = None,
    ax=None,
    method: str = "umap",
    title: Optional[str] = None,
    *,
    seed: int = 0,
    s: float = 8.0,
    alpha: float = 0.8,
    legend: bool = True,
):
    """Scatter a 2-D embedding of features, one colour per class.

    Args:
        features_or_2d: (N, C) features, embedded with :func:`embed_2d`, or an
            already embedded (N, 2) array (used as is: compute UMAP once,
            plot many times).
        labels: (N,) integer class labels, or None for a single colour.
        classes: class names indexed by label (legend text).
        ax: axes to draw on; a new figure when None.
        method: "umap" or "pca" (ignored for (N, 2) input except for the
            axis labels).
        title: axes title.
        seed: UMAP random state.
        s, alpha: marker size and opacity.
        legend: draw a legend of classes.

    Returns:
        The matplotlib figure.

    Shape:
        features_or_2d: (N, C) or (N, 2); labels: (N,)

    Raises:
        ValueError: labels of the wrong length, or as :func:`embed_2d`.
    """
    x = _to_numpy(features_or_2d, np.float64)
    if x.ndim != 2:
        raise ValueError(f"features_or_2d must be (N, C) or (N, 2), got shape {tuple(x.shape)}")
    if x.shape[1] == 2:
        xy, used = x, method
    else:
        xy, used = embed_2d(x, method=method, seed=seed, return_method=True)
    if ax is None:
        fig, ax = _new_figure(figsize=(5.5, 4.5))
    else:
        fig = ax.figure
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=s, alpha=alpha, linewidths=0)
    else:
        y = _to_numpy(labels).astype(np.int64).ravel()
        if y.shape[0] != xy.shape[0]:
            raise ValueError(f"labels must have one entry per point ({xy.shape[0]}), got {y.shape[0]}")
        present = np.unique(y)
        num = int(max(present.max() + 1, len(classes) if classes is not None else 0))
        colors = _class_colors(num)
        for c in present:
            sel = y == c
            name = classes[c] if classes is not None and c < len(classes) else str(int(c))
            ax.scatter(xy[sel, 0], xy[sel, 1], s=s, alpha=alpha, linewidths=0, color=colors[c], label=name)
        if legend:
            ax.legend(
                loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small", markerscale=2.0, frameon=False
            )
    name = used.upper()
    ax.set_xlabel(f"{name} 1")
    ax.set_ylabel(f"{name} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title)
    return fig


# --------------------------------------------------------------------------- similarities
def plot_similarity_histograms(
    snapshots: Union[Mapping, Sequence[Mapping]],
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
    history: Mapping[str, Sequence], keys: Optional[Sequence[str]] = None, axes=None, *, ncols: int = 4
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


# --------------------------------------------------------------------------- images
def _images_hwc(images, mean=None, std=None) -> np.ndarray:
    """(N, 3|1, H, W) images -> (N, H, W, 3) float in [0, 1] for imshow.

    uint8 is divided by 255. Floats are un-normalised with ``mean`` / ``std``
    when given (per channel, as in ``mocolab.data.normalize``); floats
    still outside [0, 1] are min-max rescaled image by image.
    """
    x = _to_numpy(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 3, H, W) or (N, 1, H, W), got shape {tuple(x.shape)}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    else:
        x = x.astype(np.float32)
        if std is not None:
            x = x * np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
        if mean is not None:
            x = x + np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
        if x.size and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
            lo = x.min(axis=(1, 2, 3), keepdims=True)
            hi = x.max(axis=(1, 2, 3), keepdims=True)
            x = (x - lo) / np.maximum(hi - lo, 1e-12)
        x = np.clip(x, 0.0, 1.0)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    return x.transpose(0, 2, 3, 1)


def plot_image_grid(
    images,
    titles: Optional[Sequence[str]] = None,
    nrow: int = 8,
    ax=None,
    *,
    pad: int = 2,
    title: Optional[str] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
):
    """A grid of images drawn as one mosaic on one axes.

    Args:
        images: (N, 3, H, W) uint8 tensor, or floats: in [0, 1], or
            normalised (pass ``mean`` / ``std`` to undo it; otherwise each
            image is min-max rescaled). 1 channel is shown grey.
        titles: optional N short captions, drawn above each tile.
        nrow: images per row (like ``torchvision.utils.make_grid``).
        ax: axes to draw on; a new figure when None.
        pad: white pixels between tiles.
        title: axes title.
        mean, std: per-channel normalisation to undo (e.g.
            ``mocolab.data.CIFAR10_MEAN`` / ``CIFAR10_STD`` for augmented views).

    Returns:
        The matplotlib figure.

    Shape:
        images: (N, 3, H, W)

    Raises:
        ValueError: wrong image shape, nrow < 1, or len(titles) != N.
    """
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    x = _images_hwc(images, mean, std)  # (N, H, W, 3)
    n, h, w, _ = x.shape
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles must have one entry per image ({n}), got {len(titles)}")
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    top = 0 if titles is None else max(6, h // 3)  # room for the caption above each tile
    mosaic = np.ones((rows * (h + pad + top) + pad, cols * (w + pad) + pad, 3), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        y0 = pad + r * (h + pad + top) + top
        x0 = pad + c * (w + pad)
        mosaic[y0 : y0 + h, x0 : x0 + w] = x[i]
    if ax is None:
        scale = 1.2 if titles is not None else 1.0
        fig, ax = _new_figure(figsize=(max(2.0, 1.1 * cols), max(1.5, 1.1 * scale * rows)))
    else:
        fig = ax.figure
    ax.imshow(mosaic, interpolation="nearest")
    if titles is not None:
        for i, t in enumerate(titles):
            r, c = divmod(i, cols)
            ax.text(
                pad + c * (w + pad) + w / 2,
                pad + r * (h + pad + top) + top - 1,
                str(t),
                ha="center",
                va="bottom",
                fontsize="x-small",
            )
    ax.set_axis_off()
    if title is not None:
        ax.set_title(title)
    return fig


class Neighbours(NamedTuple):
    """Result of :func:`nearest_and_hardest` (indices into the keys)."""

    nearest: torch.Tensor  # (k,) long: most similar keys with the query's label
    nearest_sims: torch.Tensor  # (k,)
    hardest: torch.Tensor  # (k,) long: most similar keys with another label
    hardest_sims: torch.Tensor  # (k,)


def nearest_and_hardest(
    q_feat,
    key_feats,
    key_labels,
    query_label,
    k: int = 5,
    *,
    exclude_index: Optional[int] = None,
) -> Neighbours:
    """A query's most similar positive keys and its hardest negatives.

    Similarity is cosine (features are L2-normalised here). "Nearest" are
    the k keys with the highest similarity among keys with the query's label
    (same instance or same class, depending on what the labels mean);
    "hardest negatives" are the k keys with the highest similarity among
    keys with a different label. Ties are broken by the lower index.

    Args:
        q_feat: (C,) query feature.
        key_feats: (M, C) key features.
        key_labels: (M,) labels of the keys.
        query_label: the query's label.
        k: how many of each (fewer are returned when fewer exist).
        exclude_index: a key index to leave out (the query itself when it is
            in the keys).

    Returns:
        :class:`Neighbours` (nearest, nearest_sims, hardest, hardest_sims),
        sorted by decreasing similarity.

    Shape:
        q_feat: (C,), key_feats: (M, C), key_labels: (M,) -> (k,) each

    Raises:
        ValueError: k < 1, or mismatched shapes.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = torch.as_tensor(q_feat).detach().float().cpu().reshape(-1)  # (C,)
    keys = torch.as_tensor(key_feats).detach().float().cpu()  # (M, C)
    labels = torch.as_tensor(key_labels).detach().cpu().reshape(-1)  # (M,)
    if keys.ndim != 2 or keys.shape[1] != q.shape[0]:
        raise ValueError(f"key_feats must be (M, {q.shape[0]}) to match q_feat, got {tuple(keys.shape)}")
    if labels.shape[0] != keys.shape[0]:
        raise ValueError(f"key_labels must have one label per key ({keys.shape[0]}), got {labels.shape[0]}")
    q = torch.nn.functional.normalize(q, dim=0)
    keys = torch.nn.functional.normalize(keys, dim=1)
    sims = keys @ q  # (M,)
    same = labels == torch.as_tensor(query_label)  # (M,)
    valid = torch.ones_like(same)
    if exclude_index is not None:
        valid[exclude_index] = False

    def top(mask: torch.Tensor):
        idx = torch.nonzero(mask & valid).flatten()  # candidates, increasing index
        order = torch.sort(-sims[idx], stable=True).indices[:k]
        chosen = idx[order]
        return chosen, sims[chosen]

    nearest, nearest_sims = top(same)
    hardest, hardest_sims = top(~same)
    return Neighbours(nearest, nearest_sims, hardest, hardest_sims)


def plot_neighbours(
    query_img,
    neighbour_imgs,
    neighbour_sims,
    hardest_neg_imgs,
    hardest_neg_sims,
    *,
    neighbour_titles: Optional[Sequence[str]] = None,
    hardest_titles: Optional[Sequence[str]] = None,
    query_title: str = "query",
    axes=None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
):
    """Gallery: a query, its nearest keys and its hardest negatives.

    Row 1: the query, then its nearest keys; row 2: its hardest negatives
    (the most similar keys of another class). Each title shows the cosine
    similarity to the query (plus ``*_titles`` when given, e.g. class names).

    Args:
        query_img: (3, H, W) uint8 image.
        neighbour_imgs: (k, 3, H, W) nearest keys; neighbour_sims: (k,).
        hardest_neg_imgs: (j, 3, H, W) hardest negatives; hardest_neg_sims: (j,).
        neighbour_titles, hardest_titles: optional captions (class names).
        query_title: caption of the query.
        mean, std: normalisation to undo for float images (see :func:`plot_image_grid`).
        axes: a (2, 1 + max(k, j)) array of axes; a new figure when None.

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: numbers of images and similarities differ, or too few axes.
    """
    q = _images_hwc(query_img, mean, std)[0]
    nb = _images_hwc(neighbour_imgs, mean, std) if len(neighbour_imgs) else np.zeros((0, 1, 1, 3))
    hn = _images_hwc(hardest_neg_imgs, mean, std) if len(hardest_neg_imgs) else np.zeros((0, 1, 1, 3))
    nb_s = _to_numpy(neighbour_sims, np.float64).ravel()
    hn_s = _to_numpy(hardest_neg_sims, np.float64).ravel()
    if len(nb) != len(nb_s) or len(hn) != len(hn_s):
        raise ValueError(
            f"one similarity per image: {len(nb)} neighbours vs {len(nb_s)} sims, "
            f"{len(hn)} negatives vs {len(hn_s)} sims"
        )
    cols = 1 + max(len(nb), len(hn), 1)
    if axes is None:
        fig, axes = _new_figure(2, cols, figsize=(1.5 * cols, 3.6), squeeze=False)
    else:
        axes = np.asarray(axes, dtype=object)
        if axes.ndim != 2 or axes.shape[0] < 2 or axes.shape[1] < cols:
            raise ValueError(f"axes must be a (2, >= {cols}) array, got shape {axes.shape}")
        fig = axes[0, 0].figure
    for ax in np.ravel(axes):
        ax.set_axis_off()
    axes[0, 0].imshow(q, interpolation="nearest")
    axes[0, 0].set_title(query_title, fontsize="small", fontweight="bold")
    rows = (
        (0, nb, nb_s, neighbour_titles, POS_COLOR, "nearest"),
        (1, hn, hn_s, hardest_titles, NEG_COLOR, "hardest neg."),
    )
    for r, imgs, sims, names, color, label in rows:
        for j in range(len(imgs)):
            ax = axes[r, 1 + j]
            ax.imshow(imgs[j], interpolation="nearest")
            caption = f"{sims[j]:.2f}" if names is None else f"{names[j]}\n{sims[j]:.2f}"
            ax.set_title(caption, fontsize="x-small", color=color)
        if len(imgs):
            axes[r, 1].text(
                -0.08, 0.5, label, transform=axes[r, 1].transAxes, rotation=90,
                ha="right", va="center", fontsize="small", color=color,
            )
    return fig


# --------------------------------------------------------------------------- sweeps
def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def plot_sweep(
    values: Mapping[Any, Any],
    xlabel: str,
    ylabel: str,
    ax=None,
    reference: Optional[Union[Mapping[Any, float], Tuple[str, Mapping[Any, float]]]] = None,
    *,
    reference_label: str = "paper",
    categorical: Optional[bool] = None,
    xscale: Optional[str] = None,
    label: str = "this notebook",
    title: Optional[str] = None,
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
    if ax is None:
        fig, ax = _new_figure(figsize=(5.0, 3.6))
    else:
        fig = ax.figure
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

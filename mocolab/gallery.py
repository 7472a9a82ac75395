"""Pictures of samples: an embedding scatter, image grids, a query's neighbours.

Letters: N samples, C feature dim, k neighbours.

Like :mod:`mocolab.plotting` (whose figure helpers it uses), every function takes ``ax=None``
(or ``axes=None``), draws onto the given axes or onto a new figure and returns the figure.
The numbers come from elsewhere: the 2-D coordinates from :func:`~mocolab.embedding.embed_2d`,
a query's neighbours from :func:`~mocolab.metrics.nearest_and_hardest`, and normalised views are
un-normalised with :func:`~mocolab.augment.denormalize`.

Functions:
    plot_embedding: a 2-D embedding of features (UMAP or PCA), coloured by class (notebook 09).
    plot_image_grid: a grid of images with optional captions.
    plot_neighbours: a query, its nearest keys and its hardest negatives.

matplotlib is imported when a function is called, not at ``import mocolab``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .augment import denormalize
from .checks import positive_int
from .embedding import embed_2d
from .plotting import NEG_COLOR, POS_COLOR, _figure_for, _new_figure, _to_numpy

__all__ = ["plot_embedding", "plot_image_grid", "plot_neighbours"]


# --------------------------------------------------------------------------- embeddings
def _class_colors(num: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if num <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(num)]


def plot_embedding(
    features_or_2d,
    labels=None,
    classes: Sequence[str] | None = None,
    ax=None,
    method: str = "umap",
    title: str | None = None,
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
    fig, ax = _figure_for(ax, (5.5, 4.5))
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


# --------------------------------------------------------------------------- images
def _images_hwc(images, mean=None, std=None) -> np.ndarray:
    """(N, 3|1, H, W) images -> (N, H, W, 3) float in [0, 1] for imshow.

    uint8 is divided by 255. Floats are un-normalised with ``mean`` / ``std``
    when given (per channel, as in ``mocolab.augment.normalize``); floats
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
        if mean is not None or std is not None:  # x·std + mean, per channel
            c = x.shape[1]
            x = denormalize(torch.from_numpy(x), (0.0,) * c if mean is None else mean,
                            (1.0,) * c if std is None else std).numpy()
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
    titles: Sequence[str] | None = None,
    nrow: int = 8,
    ax=None,
    *,
    pad: int = 2,
    title: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
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
            ``mocolab.datasets.CIFAR10_MEAN`` / ``CIFAR10_STD`` for augmented views).

    Returns:
        The matplotlib figure.

    Shape:
        images: (N, 3, H, W)

    Raises:
        ValueError: wrong image shape, nrow < 1, or len(titles) != N.
    """
    nrow = positive_int(nrow, "nrow")
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
    scale = 1.2 if titles is not None else 1.0
    fig, ax = _figure_for(ax, (max(2.0, 1.1 * cols), max(1.5, 1.1 * scale * rows)))
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


def plot_neighbours(
    query_img,
    neighbour_imgs,
    neighbour_sims,
    hardest_neg_imgs,
    hardest_neg_sims,
    *,
    neighbour_titles: Sequence[str] | None = None,
    hardest_titles: Sequence[str] | None = None,
    query_title: str = "query",
    axes=None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
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

"""Tests for the views (mocolab.plotting, mocolab.gallery, mocolab.embedding): figures are returned, axes
respected, no global style change."""
from __future__ import annotations

import os
import sys
import warnings

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mocolab import (
    embedding as E,  # noqa: E402
    gallery as G,  # noqa: E402
    plotting as P,  # noqa: E402
)
from mocolab.metrics import temperature_softmax  # noqa: E402
from mocolab.momentum import ema_track  # noqa: E402
from mocolab.queue import queue_staleness  # noqa: E402


@pytest.fixture
def rc_unchanged():
    """Fail when a test changes matplotlib's global rcParams."""
    before = dict(matplotlib.rcParams)
    yield
    after = dict(matplotlib.rcParams)
    changed = {k for k in before if before[k] != after.get(k)}
    assert not changed, f"rcParams changed: {sorted(changed)}"


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (60,), generator=g)  # (N,)
    x = torch.randn(60, 8, generator=g)  # (N, C)
    x[:, :4] += 3 * torch.nn.functional.one_hot(y, 4)
    return x, y


def _given_ax(ncols=1, nrows=1):
    fig = Figure()
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


# --------------------------------------------------------------------------- embed_2d
def test_embed_2d_pca_shape_and_determinism(data):
    x, _ = data
    a, used = E.embed_2d(x, method="pca", return_method=True)
    b = E.embed_2d(x.numpy(), method="pca")
    assert used == "pca" and a.shape == (60, 2)
    np.testing.assert_allclose(a, b, atol=1e-10)
    # PCA oracle: the variance captured equals the top two singular values squared
    xc = x.double().numpy() - x.double().numpy().mean(0)
    s = np.linalg.svd(xc, compute_uv=False)
    np.testing.assert_allclose((a**2).sum(0), s[:2] ** 2, rtol=1e-8)


def test_embed_2d_falls_back_to_pca_without_umap(monkeypatch, data):
    x, _ = data
    monkeypatch.setitem(sys.modules, "umap", None)  # `import umap` now raises ImportError
    with pytest.warns(UserWarning, match="falling back to PCA"):
        out, used = E.embed_2d(x, method="umap", return_method=True)
    assert used == "pca"
    np.testing.assert_allclose(out, E.embed_2d(x, method="pca"))


def test_plot_embedding_falls_back_and_labels_axes(monkeypatch, data, rc_unchanged):
    x, y = data
    monkeypatch.setitem(sys.modules, "umap", None)
    with pytest.warns(UserWarning, match="PCA"):
        fig = G.plot_embedding(x, y, classes=["a", "b", "c", "d"], method="umap")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "PCA 1"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "c", "d"]


def test_embed_2d_few_points_warns():
    with pytest.warns(UserWarning, match="at least 5"):
        out, used = E.embed_2d(np.random.rand(3, 4), method="umap", return_method=True)
    assert used == "pca" and out.shape == (3, 2)


def test_embed_2d_bad_input():
    with pytest.raises(ValueError, match="method must be one of"):
        E.embed_2d(np.zeros((4, 3)), method="tsne")
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        E.embed_2d(np.zeros(5), method="pca")


def test_plot_embedding_precomputed_2d_on_given_ax(data, rc_unchanged):
    x, y = data
    xy = E.embed_2d(x, "pca")
    fig, axes = _given_ax()
    out = G.plot_embedding(xy, y, ax=axes[0, 0], method="pca", title="t")
    assert out is fig
    assert axes[0, 0].get_title() == "t"
    assert len(axes[0, 0].collections) == 4  # one scatter per class
    with pytest.raises(ValueError, match="one entry per point"):
        G.plot_embedding(xy, y[:10], method="pca")


@pytest.mark.slow
def test_embed_2d_umap(data):
    x, _ = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, used = E.embed_2d(x, method="umap", return_method=True)
    assert used == "umap" and out.shape == (60, 2) and np.isfinite(out).all()


# --------------------------------------------------------------------------- similarity histograms
def _snaps():
    rng = np.random.default_rng(0)
    return [
        {"epoch": 0, "pos": rng.uniform(-1, 1, 100), "neg": rng.normal(0, 0.3, 500)},
        {"title": "end", "pos": torch.rand(100) * 0.5 + 0.5, "neg": torch.randn(500) * 0.2},
    ]


def test_similarity_histograms_new_and_given_axes(rc_unchanged):
    fig = P.plot_similarity_histograms(_snaps())
    assert isinstance(fig, Figure)
    assert [a.get_title() for a in fig.axes] == ["epoch 0", "end"]
    assert all(a.get_xlim() == (-1.0, 1.0) for a in fig.axes)
    given, axes = _given_ax(ncols=2)
    assert P.plot_similarity_histograms(_snaps(), axes=axes[0]) is given
    # the means are marked by vertical lines at the sample means
    snap = _snaps()[0]
    xs = sorted(line.get_xdata()[0] for line in axes[0, 0].lines)
    np.testing.assert_allclose(xs, sorted([snap["pos"].mean(), snap["neg"].mean()]))


def test_similarity_histograms_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        P.plot_similarity_histograms([])
    with pytest.raises(ValueError, match="'pos' and 'neg'"):
        P.plot_similarity_histograms([{"pos": [0.1]}])
    _, axes = _given_ax(ncols=1)
    with pytest.raises(ValueError, match="at least 2 axes"):
        P.plot_similarity_histograms(_snaps(), axes=axes[0])


# --------------------------------------------------------------------------- curves
def test_plot_curves_default_keys_and_x(rc_unchanged):
    h = {"epoch": [1, 2, 3], "loss": [3.0, 2.0, 1.5], "knn_acc": [0.2, None, 0.4], "note": "x"}
    fig = P.plot_curves(h)
    assert [a.get_title() for a in fig.axes] == ["loss", "knn_acc"]
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_xdata(), [1, 2, 3])
    assert fig.axes[0].get_xlabel() == "epoch"
    np.testing.assert_array_equal(fig.axes[1].lines[0].get_xdata(), [1, 3])  # None skipped
    wide = P.plot_curves({f"m{i}": [1.0, 2.0] for i in range(6)}, ncols=4)
    assert len(wide.axes) == 6  # 2 rows of up to 4, the spare panels removed


def test_plot_curves_sparse_metric_and_given_axes():
    h = {"step": [10, 20, 30, 40], "loss": [4, 3, 2, 1], "knn": [0.1, 0.5], "knn_epoch": [2, 4]}
    fig, axes = _given_ax(ncols=2)
    assert P.plot_curves(h, keys=["loss", "knn"], axes=axes[0]) is fig
    np.testing.assert_array_equal(axes[0, 1].lines[0].get_xdata(), [2, 4])
    # the history written by mocolab.train: kNN evaluated at its own epochs (incl. epoch 0)
    h = {"epoch": [1, 2], "loss": [2.0, 1.0], "knn_epoch": [0, 2], "knn_acc": [10.0, 30.0], "step_loss": [3, 2, 1]}
    fig = P.plot_curves(h)
    assert [a.get_title() for a in fig.axes] == ["loss", "knn_acc", "step_loss"]
    np.testing.assert_array_equal(fig.axes[1].lines[0].get_xdata(), [0, 2])
    assert fig.axes[2].get_xlabel() == "step"
    with pytest.raises(ValueError, match="not in history"):
        P.plot_curves(h, keys=["missing"])
    with pytest.raises(ValueError, match="nothing to plot"):
        P.plot_curves({"epoch": [1, 2]})


# --------------------------------------------------------------------------- images and neighbours
def test_plot_image_grid(rc_unchanged):
    imgs = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    fig = G.plot_image_grid(imgs, titles=[str(i) for i in range(10)], nrow=4)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.images) == 1 and len(ax.texts) == 10
    mosaic = ax.images[0].get_array()
    # first tile sits at (pad + caption room, pad) and equals image 0
    np.testing.assert_allclose(mosaic[8 : 8 + 8, 2 : 2 + 8], imgs[0].permute(1, 2, 0).numpy() / 255.0, atol=1e-6)
    given, axes = _given_ax()
    assert G.plot_image_grid(imgs.float() / 255, ax=axes[0, 0]) is given
    with pytest.raises(ValueError, match="one entry per image"):
        G.plot_image_grid(imgs, titles=["a"])
    # normalised floats: mean / std undo the normalisation exactly
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    m, sd = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    fig = G.plot_image_grid((imgs.float() / 255 - m) / sd, nrow=4, mean=mean, std=std, pad=0)
    tile = fig.axes[0].images[0].get_array()[:8, :8]
    np.testing.assert_allclose(tile, imgs[0].permute(1, 2, 0).numpy() / 255.0, atol=1e-5)
    fig = G.plot_image_grid((imgs.float() / 255 - m) / sd, nrow=4, pad=0)  # no stats: rescaled into [0, 1]
    arr = fig.axes[0].images[0].get_array()
    assert arr.min() >= 0 and arr.max() <= 1
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        G.plot_image_grid(torch.zeros(2, 5, 4, 4))


def test_plot_neighbours(rc_unchanged):
    imgs = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8)
    fig = G.plot_neighbours(
        imgs[0], imgs[1:4], torch.tensor([0.9, 0.8, 0.7]), imgs[4:6], [0.6, 0.5], hardest_titles=["cat", "dog"]
    )
    assert isinstance(fig, Figure)
    titles = [a.get_title() for a in fig.axes]
    assert "query" in titles and "0.90" in titles and "cat\n0.60" in titles
    given, axes = _given_ax(ncols=4, nrows=2)
    assert G.plot_neighbours(imgs[0], imgs[1:4], [0.9, 0.8, 0.7], imgs[4:6], [0.6, 0.5], axes=axes) is given
    with pytest.raises(ValueError, match="one similarity per image"):
        G.plot_neighbours(imgs[0], imgs[1:4], [0.9], imgs[4:6], [0.6, 0.5])


# --------------------------------------------------------------------------- sweeps
def test_plot_sweep_with_reference(rc_unchanged):
    fig = P.plot_sweep(
        {0.0: 30.0, 0.9: [44.0, 46.0], 0.99: 52.0},
        "m",
        "kNN accuracy (%)",
        reference=("MoCo Fig. 5", {0.99: 59.0, 0.999: 58.0}),
        categorical=True,
    )
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "published (MoCo Fig. 5)" in labels
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.0", "0.9", "0.99", "0.999"]
    given, axes = _given_ax()
    out = P.plot_sweep({256: 0.4, 4096: 0.5}, "K", "acc", ax=axes[0, 0], xscale="log")
    assert out is given and axes[0, 0].get_xscale() == "log"
    np.testing.assert_array_equal(axes[0, 0].lines[0].get_xdata(), [256, 4096])
    with pytest.raises(ValueError, match="at least one"):
        P.plot_sweep({}, "x", "y")


def test_no_pyplot_figures_left_open(data):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    x, y = data
    G.plot_embedding(E.embed_2d(x, "pca"), y, method="pca")
    P.plot_curves({"loss": [1, 2]})
    assert plt.get_fignums() == before


def test_explorer_plots_do_not_touch_pyplot_or_rcparams():
    import matplotlib
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    rc = dict(matplotlib.rcParams)
    P.plot_temperature_softmax(temperature_softmax([0.5, 0.1, 0.0], 0.1))
    P.plot_ema_track(ema_track(0.9, 20))
    P.plot_queue_staleness(queue_staleness(100, 32))
    assert plt.get_fignums() == before
    assert dict(matplotlib.rcParams) == rc


def test_save_figure_grids_lays_out_and_writes(tmp_path):
    import matplotlib.pyplot as plt

    from mocolab.plotting import save_figure

    fig, axes = plt.subplots(1, 2)
    assert save_figure(fig, tmp_path / "f.png", axes) is fig
    assert (tmp_path / "f.png").stat().st_size > 0
    assert all(any(line.get_visible() for line in ax.get_xgridlines()) for ax in axes)
    plt.close(fig)

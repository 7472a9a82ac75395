"""Feature vectors in two dimensions, for a scatter plot: UMAP, or PCA when UMAP cannot run.

Letters: N points, C feature dim.

:func:`embed_2d` computes the (N, 2) coordinates; :func:`mocolab.gallery.plot_embedding` draws them.
umap-learn is imported when UMAP is asked for, not at ``import mocolab``.
"""
from __future__ import annotations

import warnings

import numpy as np

from .checks import choice
from .metrics import as_float64

__all__ = ["EMBED_METHODS", "embed_2d"]

EMBED_METHODS = ("umap", "pca")


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
) -> np.ndarray | tuple[np.ndarray, str]:
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
    choice(method, "method", EMBED_METHODS)
    x = as_float64(features)
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

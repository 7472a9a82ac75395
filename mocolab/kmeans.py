"""k-means in torch: Lloyd's algorithm with k-means++ seeding, on one or a batch of point sets.

Letters: B point sets, N points, C dimensions, k clusters.

:class:`~mocolab.hard_negatives.ClusterMoCo` clusters its queue's keys with it (``spherical=True``:
cosine k-means on unit vectors).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .checks import integer

__all__ = ["KMeansResult", "kmeans"]


class KMeansResult(NamedTuple):
    """Result of :func:`kmeans`.

    Attributes:
        centroids: (B, k, C) or (k, C).
        assignments: (B, N) or (N,), the cluster of each point.
        inertia: (B,) or scalar, the sum of squared distances to the assigned centroids
            (1 − cosine for ``spherical=True``).
    """

    centroids: torch.Tensor
    assignments: torch.Tensor
    inertia: torch.Tensor


def _kmeanspp_init(x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007), batched. x (B, N, C) -> (B, k, C)."""
    b, n, _ = x.shape
    ar = torch.arange(b, device=x.device)
    first = torch.randint(n, (b,), device=x.device, generator=generator)
    centroids = [x[ar, first]]  # (B, C)
    d2 = (x - centroids[0][:, None]).pow(2).sum(-1)  # (B, N), squared distance to the nearest centroid
    for _ in range(1, k):
        w = d2.clamp_min(0)
        w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))  # all points equal: uniform
        nxt = torch.multinomial(w, 1, generator=generator)[:, 0]  # (B,)
        centroids.append(x[ar, nxt])
        d2 = torch.minimum(d2, (x - centroids[-1][:, None]).pow(2).sum(-1))
    return torch.stack(centroids, dim=1)  # (B, k, C)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 20, spherical: bool = False, tol: float = 1e-6,
           generator: torch.Generator | None = None) -> KMeansResult:
    """Lloyd's k-means with k-means++ seeding, in torch, on one or a batch of point sets.

    With ``spherical=True`` points and centroids are compared by cosine similarity and
    centroids are renormalised to unit length after each update (for L2-normalised keys).
    An empty cluster keeps its previous centroid.

    Args:
        x: points; a leading batch dimension runs B independent k-means at once.
        k: number of clusters, 1 ≤ k ≤ N.
        iters: maximum Lloyd iterations (≥ 1); stops early when centroids move less than ``tol``.
        spherical: cosine k-means (points are L2-normalised first).
        tol: convergence threshold on the largest centroid move.
        generator: optional ``torch.Generator`` (on x's device) for the seeding.

    Shape:
        x: (N, C) or (B, N, C) -> centroids (k, C) / (B, k, C), assignments (N,) / (B, N).

    Raises:
        ValueError: x not 2-D or 3-D, k outside [1, N], iters < 1.
    """
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (N, C) or (B, N, C), got {tuple(x.shape)}")
    batched = x.dim() == 3
    xb = (x if batched else x[None]).float()  # (B, N, C)
    n = xb.shape[1]
    k = integer(k, "k (number of clusters)", 1)
    if k > n:
        raise ValueError(f"k (number of clusters) must be <= the number of points N = {n}, got {k}")
    iters = integer(iters, "iters", 1)
    if spherical:
        xb = F.normalize(xb, dim=2)
    c = _kmeanspp_init(xb, k, generator)  # (B, k, C)
    for _ in range(iters):
        if spherical:
            assign = torch.einsum("bnc,bkc->bnk", xb, c).argmax(dim=2)  # (B, N)
        else:
            assign = torch.cdist(xb, c).argmin(dim=2)  # (B, N)
        sums = torch.zeros_like(c).scatter_add_(1, assign[..., None].expand_as(xb), xb)  # (B, k, C)
        ones = torch.ones_like(assign, dtype=c.dtype)
        counts = torch.zeros(c.shape[:2], device=x.device).scatter_add_(1, assign, ones)  # (B, k)
        new = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], c)  # (B, k, C)
        if spherical:
            new = F.normalize(new, dim=2)
        moved = (new - c).norm(dim=2).max()
        c = new
        if moved <= tol:
            break
    if spherical:
        sim = torch.einsum("bnc,bkc->bnk", xb, c)  # (B, N, k)
        assign = sim.argmax(dim=2)
        inertia = (1 - sim.gather(2, assign[..., None])[..., 0]).sum(dim=1)  # (B,)
    else:
        d = torch.cdist(xb, c)  # (B, N, k)
        assign = d.argmin(dim=2)
        inertia = d.gather(2, assign[..., None])[..., 0].pow(2).sum(dim=1)
    if not batched:
        return KMeansResult(c[0], assign[0], inertia[0])
    return KMeansResult(c, assign, inertia)

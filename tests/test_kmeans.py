"""Tests for mocolab.kmeans: Lloyd's k-means with k-means++ seeding, single and batched."""
from __future__ import annotations

import pytest
import torch

from mocolab.kmeans import kmeans


def blobs(n_per=30, k=4, C=5, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.eye(C)[:k]
    x = torch.cat([c + spread * torch.randn(n_per, C, generator=g) for c in centers])
    y = torch.arange(k).repeat_interleave(n_per)
    return x, y, centers


def same_partition(a, b):
    """Two labelings describe the same partition (up to renaming clusters)."""
    return all(len(set(b[a == c].tolist())) == 1 for c in a.unique()) and len(a.unique()) == len(b.unique())


@pytest.mark.parametrize("spherical", [False, True])
def test_kmeans_recovers_separable_blobs(spherical):
    x, y, centers = blobs()
    res = kmeans(x, 4, iters=20, spherical=spherical, generator=torch.Generator().manual_seed(0))
    assert res.centroids.shape == (4, 5) and res.assignments.shape == (120,)
    assert same_partition(res.assignments, y)
    if not spherical:  # each centroid is the mean of its blob
        for c in range(4):
            torch.testing.assert_close(res.centroids[res.assignments[y == c][0]], x[y == c].mean(0))
    else:
        torch.testing.assert_close(res.centroids.norm(dim=1), torch.ones(4))


def test_kmeans_batched_matches_single_runs_and_inertia_closed_form():
    xs = torch.stack([blobs(seed=s)[0] for s in range(3)])  # (3, 120, 5)
    res = kmeans(xs, 4, generator=torch.Generator().manual_seed(0))
    assert res.centroids.shape == (3, 4, 5) and res.assignments.shape == (3, 120) and res.inertia.shape == (3,)
    for b in range(3):
        assert same_partition(res.assignments[b], blobs(seed=b)[1])
        inertia = sum(float((xs[b, i] - res.centroids[b, res.assignments[b, i]]).pow(2).sum()) for i in range(120))
        assert res.inertia[b].item() == pytest.approx(inertia, rel=1e-4)


def test_kmeans_k_equals_n_and_k_one():
    x = torch.randn(6, 3)
    assert kmeans(x, 6).inertia.item() == pytest.approx(0.0, abs=1e-8)
    torch.testing.assert_close(kmeans(x, 1).centroids[0], x.mean(0))


@pytest.mark.parametrize("k,iters,match", [(0, 5, "k \\(number"), (7, 5, "<= the number"), (2, 0, "iters")])
def test_kmeans_bad_arguments(k, iters, match):
    with pytest.raises(ValueError, match=match):
        kmeans(torch.randn(6, 3), k, iters=iters)

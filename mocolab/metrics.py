"""What a representation looks like from the inside.

Letters: N samples, C feature dim, K keys.

- :func:`alignment` and :func:`uniformity` (Wang & Isola 2020): positives close, features
  spread over the sphere.
- :func:`key_consistency`: cosine between keys stored in a queue and the same keys
  recomputed with the current key encoder (1 = the queue is consistent).
- :func:`collapse_std`: the std of L2-normalised features per dimension, averaged; about
  1/√C for features spread on the sphere, 0 when everything maps to one point (SimSiam's indicator).
- :func:`similarity_stats`: positive and negative cosine similarities of a batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["alignment", "uniformity", "key_consistency", "collapse_std", "similarity_stats"]


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> float:
    """``L_align = E ‖x − y‖₂^α`` over positive pairs (rows of x and y), on normalised features.

    Shape:
        x, y: (N, C).
    """
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    x, y = F.normalize(x.float(), dim=1), F.normalize(y.float(), dim=1)
    return float((x - y).norm(dim=1).pow(alpha).mean())


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """``L_unif = log E exp(−t ‖xᵢ − xⱼ‖²)`` over distinct pairs, on normalised features (lower = more uniform).

    Shape:
        x: (N, C), N ≥ 2.
    """
    if x.shape[0] < 2:
        raise ValueError("uniformity needs at least 2 samples")
    if t <= 0:
        raise ValueError(f"t must be > 0, got {t}")
    x = F.normalize(x.float(), dim=1)
    return float(torch.pdist(x).pow(2).mul(-t).exp().mean().log())


def key_consistency(stored: torch.Tensor, recomputed: torch.Tensor) -> float:
    """Mean cosine between stored keys and the same inputs' keys from the current key encoder.

    Shape:
        stored, recomputed: (K, C), row i of both from the same input.
    """
    if stored.shape != recomputed.shape:
        raise ValueError(f"stored and recomputed keys must have the same shape, got "
                         f"{tuple(stored.shape)} and {tuple(recomputed.shape)}")
    return float(F.cosine_similarity(stored.float(), recomputed.float(), dim=1).mean())


def collapse_std(z: torch.Tensor) -> float:
    """Std over the batch of L2-normalised features, averaged over dimensions (0 = collapsed, ≈1/√C = spread).

    Shape:
        z: (N, C), N ≥ 2.
    """
    if z.shape[0] < 2:
        raise ValueError("collapse_std needs at least 2 samples")
    return float(F.normalize(z.float(), dim=1).std(dim=0).mean())


def similarity_stats(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor) -> dict:
    """Cosine similarities of positives (qᵢ·kᵢ) and negatives (qᵢ·each negative).

    Shape:
        q, k: (N, C); negatives: (C, K) or (K, C) when K ≠ C is ambiguous-free — pass (C, K) like a queue.

    Returns:
        dict with ``pos`` (N,) and ``neg`` (N·K,) numpy arrays, and their means ``pos_mean``, ``neg_mean``.
    """
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    neg = F.normalize(negatives.float(), dim=0)
    pos = (q * k).sum(dim=1)  # (N,)
    negs = (q @ neg).flatten()  # (N·K,)
    return {"pos": pos.cpu().numpy(), "neg": negs.cpu().numpy(),
            "pos_mean": float(pos.mean()), "neg_mean": float(negs.mean())}

"""What a representation looks like from the inside.

Letters: N samples, C feature dim, K keys.

- :func:`alignment` and :func:`uniformity` (Wang & Isola 2020): positives close, features
  spread over the sphere.
- :func:`key_consistency`: cosine between keys stored in a queue and the same keys
  recomputed with the current key encoder (1 = the queue is consistent).
  :class:`KeyConsistencyProbe` keeps what is needed to measure it during training.
- :func:`collapse_std`: the std of L2-normalised features per dimension, averaged; about
  1/√C for features spread on the sphere, 0 when everything maps to one point (SimSiam's indicator).
- :func:`similarity_stats`: positive and negative cosine similarities of a batch.
- :func:`nearest_and_hardest`: a query's most similar keys of its own label and of other labels.
- :func:`temperature_softmax`: the InfoNCE softmax of one query's similarities at a temperature T
  (:func:`default_similarities` makes up a plausible similarity vector).
"""
from __future__ import annotations

import copy
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checks import choice, finite_positive, positive_int

__all__ = ["alignment", "uniformity", "key_consistency", "KeyConsistencyProbe", "collapse_std", "similarity_stats",
           "Neighbours", "nearest_and_hardest", "temperature_softmax", "default_similarities"]


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> float:
    """``L_align = E ‖x − y‖₂^α`` over positive pairs (rows of x and y), on normalised features.

    Shape:
        x, y: (N, C).
    """
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    alpha = finite_positive(alpha, "alpha")
    x, y = F.normalize(x.float(), dim=1), F.normalize(y.float(), dim=1)
    return float((x - y).norm(dim=1).pow(alpha).mean())


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """``L_unif = log E exp(−t ‖xᵢ − xⱼ‖²)`` over distinct pairs, on normalised features (lower = more uniform).

    Shape:
        x: (N, C), N ≥ 2.
    """
    if x.shape[0] < 2:
        raise ValueError("uniformity needs at least 2 samples")
    t = finite_positive(t, "t")
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


class KeyConsistencyProbe:
    """Measures how consistent a MoCo queue is while it trains (He et al. 2020, section 3.2).

    Keys in the queue were computed by the key encoders of the last K/N steps. For a key
    ``k_j`` enqueued ``a`` steps ago from the view ``x_j``, its consistency is
    ``cos(k_j, f_θk(x_j))`` with ``θk`` the key encoder *now*; 1 means the stored key is what
    the current key encoder would write. The probe is an ``on_step`` callback of
    :func:`mocolab.train.fit`: after every step it keeps the key views of the step
    (``state.im_k``; with a symmetric model both views) and the keys the model has just
    enqueued for them, for the last ``steps`` steps. :meth:`measure` recomputes keys for the
    kept views with the current key encoder and compares them with the stored ones.

    BatchNorm is part of the definition. ``bn="train"`` (default) recomputes each step's views
    as one batch in training mode, so BN uses that batch's statistics as it did when the keys
    were made; without a key shuffle an unchanged key encoder gives exactly 1 (with a
    shuffle the BN groups differ, which lowers it a little). ``bn="eval"`` uses the running
    statistics instead. The recomputation runs on a copy of the key encoder: the model's BN
    running statistics are not touched.

    Args:
        steps: how many recent steps to keep (a ring). None: enough steps to cover the whole
            queue, ``ceil(K / keys per step)``, decided at the first step.
        bn: ``"train"`` or ``"eval"`` (see above).

    Shape:
        views kept per step: (N, 3, H, W) (2N when symmetric); keys (N, C).

    Raises:
        ValueError: ``steps`` < 1 or an unknown ``bn``; :meth:`measure` before any step.
    """

    BN_MODES = ("train", "eval")

    def __init__(self, steps: int | None = None, bn: str = "train"):
        self.steps = None if steps is None else positive_int(steps, "steps (or None: the whole queue)")
        self.bn = choice(bn, "bn", self.BN_MODES)
        self._kept: list[tuple[list, torch.Tensor]] = []  # ([view batches], stored keys), oldest first
        self._model: nn.Module | None = None
        self.last: dict | None = None

    @torch.no_grad()
    def record(self, model: nn.Module, im_q: torch.Tensor, im_k: torch.Tensor) -> None:
        """Keep the key views of the step that has just run and the keys ``model`` enqueued for them."""
        batches = [im_q, im_k] if getattr(model, "symmetric", False) else [im_k]  # keys were made batch by batch
        n = sum(b.shape[0] for b in batches)
        if self.steps is None:
            self.steps = max(1, math.ceil(model.queue.shape[1] / n))
        self._kept.append(([b.detach().clone() for b in batches], model.latest(n).clone()))
        self._model = model
        del self._kept[:-self.steps]

    def __call__(self, state) -> None:
        """``fit(..., on_step=probe)``: record the step described by ``state``."""
        self.record(state.model, state.im_q, state.im_k)

    def on_epoch(self, epoch: int, history: dict) -> None:
        """``fit(..., on_epoch=probe.on_epoch)``: measure the recorded model and append to ``history``
        ``key_consistency`` (mean cosine), ``key_identification`` (%) and ``key_margin``; the full
        result of the last measurement is kept in ``probe.last``."""
        self.last = self.measure(self._model)
        for key, name in (("key_consistency", "mean"), ("key_identification", "identification"),
                          ("key_margin", "margin")):
            history.setdefault(key, []).append(self.last[name])

    def __len__(self) -> int:
        return len(self._kept)

    @torch.no_grad()
    def measure(self, model: nn.Module) -> dict:
        """Recompute the kept keys with ``model.encoder_k`` as it is now and compare.

        The mean cosine alone is fooled by collapse: if every key is the same vector, stored and
        recomputed keys agree perfectly. Two measures relative to the other keys are returned too:
        ``identification``, the % of recomputed keys whose most similar stored key (among all
        kept keys) is their own (chance 100 / num_keys), and ``margin``, the mean of
        ``cos(sᵢ, rᵢ) − mean_{j≠i} cos(sⱼ, rᵢ)`` (≈ 0 for collapsed keys).

        Returns:
            dict with ``mean`` (cosine over all kept keys), ``by_age`` (list, index a = keys
            enqueued a steps before the latest step, 0 = the latest), ``identification`` (%),
            ``margin`` and ``num_keys``.
        """
        if not self._kept:
            raise ValueError("no step recorded yet: pass the probe to fit(on_step=...) or call record() first")
        encoder = copy.deepcopy(model.encoder_k).train(self.bn == "train")
        stored, recomputed, by_age = [], [], []
        for batches, s in reversed(self._kept):  # newest first
            r = F.normalize(torch.cat([encoder(b).float() for b in batches]), dim=1)  # (N, C)
            stored.append(F.normalize(s.float(), dim=1))
            recomputed.append(r)
            by_age.append(float((stored[-1] * r).sum(dim=1).mean()))
        s, r = torch.cat(stored), torch.cat(recomputed)  # (K', C)
        sim = r @ s.t()  # (K', K'): recomputed i against stored j
        own = sim.diagonal()  # (K',)
        n = own.numel()
        others = (sim.sum(dim=1) - own) / max(1, n - 1)  # (K',)
        identified = sim.argmax(dim=1) == torch.arange(n, device=sim.device)
        return {"mean": float(own.mean()), "by_age": by_age, "identification": 100.0 * float(identified.float().mean()),
                "margin": float((own - others).mean()), "num_keys": n}


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
    exclude_index: int | None = None,
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
    k = positive_int(k, "k")
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


def temperature_softmax(similarities, T: float) -> dict:
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
    T = finite_positive(T, "T")
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


def as_float64(x) -> np.ndarray:
    """A tensor (any device or dtype) or array-like as a float64 NumPy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _as_1d(x, name: str) -> np.ndarray:
    x = as_float64(x).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite")
    return x


def default_similarities(K: int = 16, seed: int = 0, positive: float = 0.6) -> np.ndarray:
    """A plausible (K+1,) similarity vector: positive first, negatives ~ N(0, 0.25)."""
    rng = np.random.default_rng(seed)
    neg = np.clip(rng.normal(0.0, 0.25, size=K), -1.0, 1.0)
    return np.concatenate([[positive], neg])

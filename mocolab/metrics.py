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
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["alignment", "uniformity", "key_consistency", "KeyConsistencyProbe", "collapse_std", "similarity_stats"]


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
        if steps is not None and int(steps) < 1:
            raise ValueError(f"steps must be None (the whole queue) or a positive integer, got {steps}")
        if bn not in self.BN_MODES:
            raise ValueError(f"bn must be one of {self.BN_MODES}, got {bn!r}")
        self.steps, self.bn = (None if steps is None else int(steps)), bn
        self._kept: list[tuple[list, torch.Tensor]] = []  # ([view batches], stored keys), oldest first
        self._model: nn.Module | None = None
        self.last: dict | None = None

    @staticmethod
    def latest_keys(queue: nn.Module, n: int) -> torch.Tensor:
        """The ``n`` keys most recently written to a queue (``queue`` (C, K), ``queue_ptr``), oldest first. (n, C)"""
        ptr, k = int(queue.queue_ptr), queue.queue.shape[1]
        cols = (ptr - n + torch.arange(n, device=queue.queue.device)) % k  # (n,)
        return queue.queue[:, cols].t()  # (n, C)

    @torch.no_grad()
    def record(self, model: nn.Module, im_q: torch.Tensor, im_k: torch.Tensor) -> None:
        """Keep the key views of the step that has just run and the keys ``model`` enqueued for them."""
        batches = [im_q, im_k] if getattr(model, "symmetric", False) else [im_k]  # keys were made batch by batch
        n = sum(b.shape[0] for b in batches)
        if self.steps is None:
            self.steps = max(1, math.ceil(model.queue.shape[1] / n))
        self._kept.append(([b.detach().clone() for b in batches], self.latest_keys(model, n).clone()))
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

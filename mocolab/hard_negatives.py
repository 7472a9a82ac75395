"""Changing the negatives: hard-negative mixing, debiasing, clustering-aware negatives.

Letters: N batch size, C feature dim, K queue size, S synthesized negatives per query
(s pair mixes + s' query mixes), H hardest negatives kept per query, k clusters, B batches.

Three MoCo variants that keep MoCo's query/key encoders and queue and change only
the negative term (all with the same training interface as :class:`~mocolab.moco.MoCo`; each
changes only :meth:`~mocolab.moco.MoCo.contrast` or :meth:`~mocolab.moco.MoCo.loss`):

- :class:`MoCHi` — Kalantidis et al. (2020), "Hard Negative Mixing for Contrastive
  Learning" (NeurIPS, arXiv 2010.01028): per query, new negatives are synthesized by
  mixing its hardest queue keys (:func:`mix_hard_negatives`).
- :class:`DebiasedMoCo` — Chuang et al. (2020), "Debiased Contrastive Learning" (NeurIPS,
  arXiv 2007.00224): the loss subtracts the expected share of same-class "negatives"
  (:func:`~mocolab.losses.debiased_infonce_loss`).
- :class:`ClusterMoCo` — false-negative elimination (Huynh et al. 2022, WACV, arXiv
  2011.11765) with k-means clusters as the guess, in the spirit of Local Aggregation
  (Zhuang et al. 2019, ICCV): the queue's keys are clustered with k-means (:func:`kmeans`)
  every few steps, and negatives from the query's own cluster are dropped or down-weighted,
  since they are the likeliest to be of the query's class (false negatives). Attraction
  (cluster mates as extra positives) is not implemented. :func:`false_negative_rate`
  measures how often a "negative" shares the query's true class.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .checks import in_range, integer as _check_int
from .kmeans import KMeansResult, kmeans
from .losses import debiased_infonce_loss
from .moco import MoCo

__all__ = ["HardNegatives", "mix_hard_negatives", "StepCountingMoCo", "MoCHi", "DebiasedMoCo", "KMeansResult",
           "kmeans", "false_negative_rate", "ClusterMoCo"]


# ------------------------------------------------------------------------------------------
# MoCHi: hard negative mixing
# ------------------------------------------------------------------------------------------


class HardNegatives(NamedTuple):
    """What :func:`mix_hard_negatives` synthesized for each query.

    Attributes:
        h: (N, s + s', C) unit-norm synthetic negatives: s pair mixes, then s' query mixes.
        alpha: (N, s) weight of the first negative in each pair mix, in [0, 1).
        beta: (N, s') weight of the query in each query mix, in [0, beta_max).
        hard_index: (N, H) queue columns of each query's H hardest negatives, hardest first.
    """

    h: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    hard_index: torch.Tensor


@torch.no_grad()
def mix_hard_negatives(q: torch.Tensor, negatives: torch.Tensor, n_hard: int, s: int, s_prime: int,
                       beta_max: float = 0.5, generator: torch.Generator | None = None) -> HardNegatives:
    """Synthesize hard negatives for each query by mixing its hardest negatives (MoCHi).

    For query q with negatives sorted by similarity q·n, keep the ``n_hard`` hardest (H).
    Then (Kalantidis et al. 2020, section 4):

    - s pair mixes ``h = normalize(α·nᵢ + (1 − α)·nⱼ)``, i, j drawn from the H hardest,
      α ~ U(0, 1);
    - s' query mixes ``h' = normalize(β·q + (1 − β)·nⱼ)``, β ~ U(0, beta_max) with
      beta_max ≤ 0.5, so the query's weight is always below the negative's: h' is harder
      than nⱼ but still closer to nⱼ than to q.

    Everything runs without gradient: the synthetic points are constants in the loss.

    Args:
        q: queries, L2-normalised.
        negatives: the queue, keys as columns (L2-normalised).
        n_hard: H, hardest negatives to mix from (clipped to K).
        s: pair mixes per query (≥ 0).
        s_prime: query mixes per query (≥ 0).
        beta_max: upper bound of β, in (0, 0.5].
        generator: optional ``torch.Generator`` (on q's device) for reproducible mixing.

    Shape:
        q: (N, C); negatives: (C, K); returns h (N, s + s', C), alpha (N, s), beta (N, s'),
        hard_index (N, H).

    Raises:
        ValueError: n_hard < 1, s or s_prime < 0, beta_max outside (0, 0.5], or shapes that do not match.
    """
    n_hard = _check_int(n_hard, "n_hard (hardest negatives to mix, N in the paper)", 1)
    s = _check_int(s, "s (pair mixes per query)", 0)
    s_prime = _check_int(s_prime, "s_prime (query mixes per query)", 0)
    in_range(beta_max, "beta_max", 0.0, 0.5, low_open=True, why="the query must weigh less than the negative")
    if q.dim() != 2 or negatives.dim() != 2 or negatives.shape[0] != q.shape[1]:
        raise ValueError(f"q must be (N, C) and negatives (C, K) with the same C, got {tuple(q.shape)} "
                         f"and {tuple(negatives.shape)}")
    if negatives.shape[1] < 1:
        raise ValueError("negatives must hold at least one key (K >= 1)")
    n, c = q.shape
    q = q.detach()
    H = min(n_hard, negatives.shape[1])
    neg_t = negatives.detach().t()  # (K, C)
    hard_index = (q @ negatives).topk(H, dim=1).indices  # (N, H), hardest first
    dev, dt = q.device, q.dtype

    def pick(count):  # (N, count) queue columns drawn uniformly from each query's H hardest
        j = torch.randint(H, (n, count), device=dev, generator=generator)
        return torch.gather(hard_index, 1, j)

    alpha = torch.rand(n, s, device=dev, dtype=dt, generator=generator)  # (N, s)
    ni, nj = neg_t[pick(s)], neg_t[pick(s)]  # (N, s, C) each
    h_pair = F.normalize(alpha[..., None] * ni + (1 - alpha[..., None]) * nj, dim=2)  # (N, s, C)
    beta = beta_max * torch.rand(n, s_prime, device=dev, dtype=dt, generator=generator)  # (N, s')
    nq = neg_t[pick(s_prime)]  # (N, s', C)
    h_query = F.normalize(beta[..., None] * q[:, None, :] + (1 - beta[..., None]) * nq, dim=2)  # (N, s', C)
    return HardNegatives(torch.cat([h_pair, h_query], dim=1), alpha, beta, hard_index)


class StepCountingMoCo(MoCo):
    """MoCo that counts its training steps (forwards in training mode) in the buffer ``step_count``.

    The counter is in the state dict, so a resumed run continues the warm-up and re-clustering schedules
    where it stopped. A host copy saves a device read per step.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        self._steps: int | None = 0  # host mirror of step_count; None: read it at the next use

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._steps = None

    @property
    def steps_done(self) -> int:
        """Training steps done so far."""
        if self._steps is None:
            self._steps = int(self.step_count)
        return self._steps

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, index: torch.Tensor | None = None):
        out = super().forward(im_q, im_k, index=index)
        if self.training:
            self._steps = self.steps_done + 1
            self.step_count.fill_(self._steps)
        return out


class MoCHi(StepCountingMoCo):
    """MoCo with hard negative mixing (MoCHi, Kalantidis et al. 2020, arXiv 2010.01028).

    Each query's logits get ``s + s'`` extra columns, the similarities to negatives
    synthesized from its hardest queue keys (:func:`mix_hard_negatives`), appended after
    the K queue columns: logits are (N, 1 + K + s + s'), positive at index 0. No gradient
    flows through the synthetic negatives; they are not enqueued. Mixing starts after
    ``warmup_steps`` training steps (the paper starts after a few epochs, once the queue
    holds meaningful keys).

    Args:
        base_encoder, dim, K, m, T, mlp, **moco_kwargs: as :class:`~mocolab.moco.MoCo`.
        n_hard: H, hardest negatives to mix (paper: 1024 of K = 16384).
        s: pair mixes per query (paper: up to 1024).
        s_prime: query mixes per query (paper: up to 256).
        beta_max: β ~ U(0, beta_max), in (0, 0.5].
        warmup_steps: training steps of plain MoCo before mixing starts (≥ 0).

    Shape:
        forward(im_q (N, 3, H, W), im_k (N, 3, H, W)) -> logits (N, 1 + K + s + s') (plain
        (N, 1 + K) during warm-up), labels (N,) zeros.

    Raises:
        ValueError: any MoCo argument or mixing parameter outside its range.
    """

    def __init__(self, base_encoder: Callable[..., nn.Module], dim: int = 128, K: int = 65536, m: float = 0.999,
                 T: float = 0.07, mlp: bool = False, *, n_hard: int = 1024, s: int = 1024, s_prime: int = 256,
                 beta_max: float = 0.5, warmup_steps: int = 0, **moco_kwargs):
        self._mochi_args = (_check_int(n_hard, "n_hard (hardest negatives to mix)", 1),
                            _check_int(s, "s (pair mixes per query)", 0),
                            _check_int(s_prime, "s_prime (query mixes per query)", 0))
        in_range(beta_max, "beta_max", 0.0, 0.5, low_open=True, why="the query must weigh less than the negative")
        self.warmup_steps = _check_int(warmup_steps, "warmup_steps", 0)
        super().__init__(base_encoder, dim, K, m, T, mlp, **moco_kwargs)
        self.n_hard, self.s, self.s_prime = self._mochi_args
        self.beta_max = float(beta_max)
        self.last_mix: HardNegatives | None = None

    @property
    def num_synthetic(self) -> int:
        """s + s', the synthetic columns appended to each query's logits once mixing is on."""
        return self.s + self.s_prime

    @property
    def mixing(self) -> bool:
        """Whether the next forward appends synthetic negatives."""
        return self.steps_done >= self.warmup_steps and self.num_synthetic > 0

    def contrast(self, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor,
                 index: torch.Tensor | None = None) -> torch.Tensor:
        """MoCo's logits, with the s + s' synthetic negatives of each query after the K queue columns."""
        if self.mixing:  # the synthetic points are constants: the gradient flows to q only
            q_unit = F.normalize(q.detach().to(negatives.dtype), dim=1)  # (N, C)
            self.last_mix = mix_hard_negatives(q_unit, negatives, self.n_hard, self.s, self.s_prime, self.beta_max)
            negatives = (negatives, self.last_mix.h)  # (C, K) and (N, S, C)
        return super().contrast(q, k, negatives, index)  # (N, 1+K[+S])


# ------------------------------------------------------------------------------------------
# Debiased contrastive loss
# ------------------------------------------------------------------------------------------


class DebiasedMoCo(MoCo):
    """MoCo trained with the debiased contrastive loss (Chuang et al. 2020, arXiv 2007.00224).

    The forward pass is MoCo's; only :meth:`loss` changes, to
    :func:`~mocolab.losses.debiased_infonce_loss` with class prior ``tau_plus``
    (for C balanced classes, τ⁺ ≈ 1/C). With ``tau_plus=0`` it is MoCo (up to the clamp).

    Args:
        base_encoder, dim, K, m, T, mlp, **moco_kwargs: as :class:`~mocolab.moco.MoCo`.
        tau_plus: class prior τ⁺ in [0, 1).

    Shape:
        forward as :class:`~mocolab.moco.MoCo`: logits (N, 1+K), labels (N,).

    Raises:
        ValueError: tau_plus outside [0, 1), or any MoCo argument outside its range.
    """

    def __init__(self, base_encoder: Callable[..., nn.Module], dim: int = 128, K: int = 65536, m: float = 0.999,
                 T: float = 0.07, mlp: bool = False, *, tau_plus: float = 0.1, **moco_kwargs):
        tau_plus = in_range(tau_plus, "tau_plus (the class prior τ⁺)", 0.0, 1.0, high_open=True)
        super().__init__(base_encoder, dim, K, m, T, mlp, **moco_kwargs)
        self.tau_plus = tau_plus

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Debiased loss over the 1 + K candidates (positive at index 0; ×2 when symmetric, as MoCo)."""
        loss = debiased_infonce_loss(logits, self.tau_plus, self.T)
        return 2.0 * loss if self.symmetric else loss


# ------------------------------------------------------------------------------------------
# k-means and clustering-aware negatives
# ------------------------------------------------------------------------------------------


def false_negative_rate(query_labels: torch.Tensor, negative_labels: torch.Tensor,
                        weights: torch.Tensor | None = None) -> float:
    """Fraction of (query, negative) pairs whose negative has the query's true class.

    Negatives with an unknown label (< 0) are ignored. With ``weights`` each pair counts
    with its weight (0 for a dropped negative), i.e. the share of the softmax
    denominator's negative *mass* that is a false negative at equal similarity.

    Args:
        query_labels: class of each query.
        negative_labels: class of each negative, shared (K,) or per query (N, K); -1 unknown.
        weights: optional per-pair weights ≥ 0.

    Shape:
        query_labels (N,), negative_labels (K,) or (N, K), weights (N, K). Returns a float in [0, 1]
        (nan when no pair counts).

    Raises:
        ValueError: shapes that do not match, or negative weights.
    """
    if query_labels.dim() != 1:
        raise ValueError(f"query_labels must be (N,), got {tuple(query_labels.shape)}")
    neg = negative_labels if negative_labels.dim() == 2 else negative_labels[None].expand(query_labels.shape[0], -1)
    if neg.dim() != 2 or neg.shape[0] != query_labels.shape[0]:
        raise ValueError(f"negative_labels must be (K,) or (N, K) with N = {query_labels.shape[0]}, "
                         f"got {tuple(negative_labels.shape)}")
    w = (neg >= 0).to(torch.float64)  # (N, K)
    if weights is not None:
        if weights.shape != neg.shape:
            raise ValueError(f"weights must be (N, K) = {tuple(neg.shape)}, got {tuple(weights.shape)}")
        if bool((weights < 0).any()):
            raise ValueError("weights must be >= 0")
        w = w * weights.to(torch.float64)
    same = (neg == query_labels[:, None]).to(torch.float64)  # (N, K)
    total = float(w.sum())
    return float((w * same).sum()) / total if total > 0 else math.nan


class ClusterMoCo(StepCountingMoCo):
    """MoCo whose negatives from the query's own k-means cluster are dropped or down-weighted.

    In the spirit of Local Aggregation (Zhuang et al. 2019, ICCV), which treats a sample's
    cluster mates as "close" rather than as negatives: every ``recluster_every`` training
    steps the queue's keys are clustered with spherical k-means (:func:`kmeans`, k-means++
    seeding). At every step the queries and the queue keys are assigned to the nearest
    centroid, and each negative in the query's cluster gets weight ``same_cluster_weight``
    in the softmax denominator (its logit plus ln w; w = 0 masks it to −inf).

    If class labels are given with :meth:`set_class_labels` (never used for training), each
    forward also counts how often a negative shares the query's true class, before and after
    the weighting (:meth:`false_negative_rates`).

    Args:
        base_encoder, dim, K, m, T, mlp, **moco_kwargs: as :class:`~mocolab.moco.MoCo`.
        num_clusters: k (≥ 2, at most K).
        recluster_every: run k-means every this many training steps (≥ 1).
        same_cluster_weight: w in [0, 1]: 0 drops same-cluster negatives, 1 is plain MoCo.
        kmeans_iters: Lloyd iterations per clustering (≥ 1).
        warmup_steps: training steps of plain MoCo before the first clustering (≥ 0).

    Shape:
        forward as :class:`~mocolab.moco.MoCo`: logits (N, 1+K) (−inf at dropped negatives), labels (N,).

    Raises:
        ValueError: a clustering parameter or a MoCo argument outside its range.
    """

    def __init__(self, base_encoder: Callable[..., nn.Module], dim: int = 128, K: int = 65536, m: float = 0.999,
                 T: float = 0.07, mlp: bool = False, *, num_clusters: int = 10, recluster_every: int = 20,
                 same_cluster_weight: float = 0.0, kmeans_iters: int = 10, warmup_steps: int = 0, **moco_kwargs):
        num_clusters = _check_int(num_clusters, "num_clusters", 2)
        if num_clusters > int(K):
            raise ValueError(f"num_clusters must be <= the queue size K = {K}, got {num_clusters}")
        self.recluster_every = _check_int(recluster_every, "recluster_every", 1)
        self.kmeans_iters = _check_int(kmeans_iters, "kmeans_iters", 1)
        self.warmup_steps = _check_int(warmup_steps, "warmup_steps", 0)
        w = in_range(same_cluster_weight, "same_cluster_weight", 0.0, 1.0, why="0 drops, 1 keeps")
        super().__init__(base_encoder, dim, K, m, T, mlp, **moco_kwargs)
        self.num_clusters, self.same_cluster_weight = num_clusters, w
        self.register_buffer("centroids", torch.zeros(num_clusters, dim))  # (k, C)
        self.register_buffer("has_centroids", torch.zeros((), dtype=torch.bool))
        self.register_buffer("class_labels", torch.empty(0, dtype=torch.long), persistent=False)
        self.reset_false_negative_stats()

    def set_class_labels(self, labels: torch.Tensor | None) -> None:
        """Dataset labels (M,), for measuring false negatives only (training never reads them)."""
        self.class_labels = (torch.empty(0, dtype=torch.long) if labels is None
                             else labels.detach().long()).to(self.queue.device)

    def reset_false_negative_stats(self) -> None:
        """Zero the counters behind :meth:`false_negative_rates`."""
        self._fn = {"same_before": 0.0, "total_before": 0.0, "same_after": 0.0, "total_after": 0.0}

    def false_negative_rates(self) -> dict:
        """``{"before": ..., "after": ...}``: share of negatives (weighted after) with the query's class."""
        f = self._fn
        return {"before": f["same_before"] / f["total_before"] if f["total_before"] else math.nan,
                "after": f["same_after"] / f["total_after"] if f["total_after"] else math.nan}

    @torch.no_grad()
    def recluster(self) -> None:
        """Run k-means on the current queue keys and keep the centroids."""
        keys = self.negatives().t()  # (K_valid, C)
        keys = keys[self.queue_step[: keys.shape[0]] >= 0]  # real keys only, not the random initial ones
        if keys.shape[0] < self.num_clusters:
            return
        self.centroids.copy_(kmeans(keys, self.num_clusters, iters=self.kmeans_iters, spherical=True).centroids)
        self.has_centroids.fill_(True)

    @torch.no_grad()
    def negative_weights(self, q: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """Weight of each (query, negative) pair: w in the query's cluster, 1 elsewhere. (N, K)."""
        if not bool(self.has_centroids):
            return q.new_ones(q.shape[0], negatives.shape[1])
        cq = (q @ self.centroids.t()).argmax(dim=1)  # (N,)
        cn = (negatives.t() @ self.centroids.t()).argmax(dim=1)  # (K,)
        same = cq[:, None] == cn[None, :]  # (N, K)
        return torch.where(same, q.new_tensor(self.same_cluster_weight), q.new_tensor(1.0))

    def contrast(self, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor,
                 index: torch.Tensor | None = None) -> torch.Tensor:
        """MoCo's logits, each negative's plus ln w (w: 1, or ``same_cluster_weight`` in the query's cluster)."""
        logits = super().contrast(q, k, negatives, index)  # (N, 1+K)
        w = self.negative_weights(F.normalize(q.detach().to(negatives.dtype), dim=1), negatives)  # (N, K)
        self._count_false_negatives(w, negatives.shape[1], index)
        if self.same_cluster_weight < 1.0:
            logits = logits + torch.log(F.pad(w, (1, 0), value=1.0))  # ln 0 = -inf drops the negative
        return logits

    @torch.no_grad()
    def _count_false_negatives(self, w: torch.Tensor, k_valid: int, index: torch.Tensor | None) -> None:
        if index is None or self.class_labels.numel() == 0 or not self.training:
            return
        yq = self.class_labels[index]  # (N,)
        qi = self.queue_index[:k_valid]  # (K,)
        yn = torch.where(qi >= 0, self.class_labels[qi.clamp_min(0)], torch.full_like(qi, -1))  # (K,)
        valid = (yn >= 0).to(w.dtype)[None, :]  # (1, K)
        same = (yn[None, :] == yq[:, None]).to(w.dtype)  # (N, K)
        self._fn["same_before"] += float((same * valid).sum())
        self._fn["total_before"] += float(valid.sum()) * w.shape[0]
        self._fn["same_after"] += float((same * valid * w).sum())
        self._fn["total_after"] += float((valid * w).sum())

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, index: torch.Tensor | None = None):
        since = self.steps_done - self.warmup_steps
        if self.training and since >= 0 and since % self.recluster_every == 0:
            self.recluster()
        return super().forward(im_q, im_k, index=index)

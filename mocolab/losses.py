"""Contrastive losses, from one pair at a time to a softmax over many negatives.

Letters: N batch size, C feature dim, K number of negatives, M memory-bank size.

- :func:`margin_contrastive_loss` — Hadsell, Chopra & LeCun (2006), one pair at a time.
- :func:`npair_loss` — Sohn (2016), one positive against N - 1 negatives.
- :func:`infonce_logits` / :func:`infonce_loss` — van den Oord et al. (2018), the
  softmax over 1 + K candidates with the positive at index 0, as MoCo computes it.
- :class:`NCECriterion` / :func:`nce_loss` — noise-contrastive estimation for a
  memory bank (Wu et al. 2018), with the normalising constant Z estimated once
  from the first batch, as in the paper.
- :func:`debiased_infonce_loss` — Chuang et al. (2020), InfoNCE with the expected
  contribution of same-class "negatives" removed (class prior τ⁺).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .checks import finite_positive, in_range

__all__ = ["check_temperature", "margin_contrastive_loss", "margin_loss_of_distances", "npair_loss", "infonce_logits",
           "infonce_loss", "nce_loss", "NCECriterion", "debiased_infonce_loss", "debiased_negative_term"]


def check_temperature(T: float, name: str = "T") -> float:
    """Return ``T`` as a float, or raise ``ValueError`` unless it is a finite number > 0."""
    return finite_positive(T, f"temperature {name}")


def _check_some_negatives(K: int) -> None:
    """A softmax over the positive alone is 1 whatever the features: its loss is 0 and teaches nothing."""
    if K < 1:
        raise ValueError("there are no negatives (K = 0): with the positive alone the loss is 0 whatever the "
                         "features; give at least one negative")


def margin_contrastive_loss(x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Margin contrastive loss of Hadsell, Chopra & LeCun (2006).

    ``L = (1 - Y) · ½ D² + Y · ½ · max(0, margin - D)²`` with ``D = ‖x1 - x2‖₂``,
    averaged over pairs. ``Y = 1`` marks a *dissimilar* pair (the paper's convention).

    Shape:
        x1, x2: (N, C); y: (N,) with values in {0, 1}. Returns a scalar.

    Raises:
        ValueError: ``margin`` ≤ 0, mismatched shapes, or labels other than 0 and 1.
    """
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    if x1.shape != x2.shape or x1.dim() != 2 or y.shape != x1.shape[:1]:
        raise ValueError(f"expected x1, x2 of shape (N, C) and y of shape (N,), got {tuple(x1.shape)}, "
                         f"{tuple(x2.shape)}, {tuple(y.shape)}")
    bad = y[(y != 0) & (y != 1)]
    if bad.numel():
        raise ValueError(f"y must be 0 (similar pair) or 1 (dissimilar pair), got {sorted(set(bad.tolist()))[:5]}")
    return margin_loss_of_distances((x1 - x2).pow(2).sum(dim=1), y, margin)


def margin_loss_of_distances(d2: torch.Tensor, y: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """:func:`margin_contrastive_loss` of pairs given by their squared distances ``d2`` = D², (N,) -> a scalar."""
    y = y.to(d2.dtype)
    d = d2.clamp_min(1e-12).sqrt()  # (N,)
    similar = (1 - y) * 0.5 * d.pow(2)
    dissimilar = y * 0.5 * (margin - d).clamp_min(0).pow(2)
    return (similar + dissimilar).mean()


def npair_loss(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-class N-pair loss of Sohn (2016).

    ``log(1 + Σⱼ exp(fᵀfⱼ⁻ - fᵀf⁺))`` averaged over anchors: a softmax cross-entropy
    over one positive and the negatives, with dot products as logits (no temperature).
    Without ``negatives``, the other anchors' positives in the batch are the
    negatives (the efficient batch construction of the paper).

    Shape:
        anchor, positive: (N, C); negatives: optional (N, K, C). Returns a scalar.
    """
    if anchor.shape != positive.shape or anchor.dim() != 2:
        raise ValueError(f"anchor and positive must both be (N, C), got {tuple(anchor.shape)} and "
                         f"{tuple(positive.shape)}")
    if negatives is None:
        if anchor.shape[0] < 2:
            raise ValueError("npair_loss without negatives needs a batch of N >= 2 anchors (the other anchors' "
                             f"positives are the negatives), got N = {anchor.shape[0]}: with none the loss is 0")
        logits = anchor @ positive.t()  # (N, N), positive on the diagonal
        labels = torch.arange(anchor.shape[0], device=anchor.device)
        return F.cross_entropy(logits, labels)
    if negatives.dim() != 3 or negatives.shape[0] != anchor.shape[0] or negatives.shape[2] != anchor.shape[1]:
        raise ValueError(f"negatives must be (N, K, C) = ({anchor.shape[0]}, K, {anchor.shape[1]}), "
                         f"got {tuple(negatives.shape)}")
    _check_some_negatives(negatives.shape[1])
    l_pos = (anchor * positive).sum(dim=1, keepdim=True)  # (N, 1)
    l_neg = torch.einsum("nc,nkc->nk", anchor, negatives)  # (N, K)
    logits = torch.cat([l_pos, l_neg], dim=1)  # (N, 1+K)
    return F.cross_entropy(logits, logits.new_zeros(logits.shape[0], dtype=torch.long))


def _autocast_off(device: torch.device):
    """A context that turns autocast off on ``device`` (nothing where autocast does not exist)."""
    available = getattr(torch.amp, "is_autocast_available", lambda kind: kind in ("cpu", "cuda"))  # torch < 2.4
    if available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def infonce_logits(q: torch.Tensor, k: torch.Tensor, negatives, T: float = 0.07, *, normalize: bool = False):
    """InfoNCE logits, as MoCo computes them: the positive at index 0, then the negatives, divided by T.

    ``logits[n] = [q_n·k_n, q_n·negative_1, …, q_n·negative_K] / T``; the labels are all zeros because the
    positive key always sits in column 0. This is the one place mocolab computes these logits: MoCo, its
    variants, CMC and the distillers call it.

    The contrast runs in at least fp32 with autocast off (under bf16 autocast a logit / T would be
    rounded in steps of 1/16); q is divided by T before the products (N·C values, not the N·(1+K) logits:
    one pass less over the largest tensor of a step, forward and backward; the logits are the same).

    Args:
        q: queries, (N, C): unit vectors, or any encoder output with ``normalize=True``.
        k: positive keys, (N, C), unit vectors.
        negatives: (C, K) shared by the whole batch (a queue), (N, K, C) per query (a memory bank, MoCHi's
            synthetic negatives), or a sequence of these, whose columns follow one another.
        T: temperature > 0.
        normalize: L2-normalise q first (in the contrast's precision).

    Returns:
        ``(logits, labels)`` with logits (N, 1+K) (K all the negatives together) and labels (N,) of zeros.

    K may be 0 (an empty queue's first step: logits (N, 1)); :func:`infonce_loss` refuses that.

    Raises:
        ValueError: T ≤ 0 or not finite, or shapes that do not match.
    """
    T = check_temperature(T)
    if q.dim() != 2 or q.shape != k.shape:
        raise ValueError(f"q and k must both be (N, C), got {tuple(q.shape)} and {tuple(k.shape)}")
    parts = list(negatives) if isinstance(negatives, (list, tuple)) else [negatives]
    for neg in parts:
        if neg.dim() == 2 and neg.shape[0] != q.shape[1]:
            raise ValueError(f"a shared negatives tensor must be (C, K) with C = {q.shape[1]}, got {tuple(neg.shape)}")
        if neg.dim() == 3 and (neg.shape[0] != q.shape[0] or neg.shape[2] != q.shape[1]):
            raise ValueError(f"per-query negatives must be (N, K, C) = ({q.shape[0]}, K, {q.shape[1]}), "
                             f"got {tuple(neg.shape)}")
        if neg.dim() not in (2, 3):
            raise ValueError(f"negatives must be (C, K) or (N, K, C), got {neg.dim()} dimensions")
    dtype = torch.promote_types(torch.promote_types(q.dtype, parts[0].dtype), torch.float32)
    with _autocast_off(q.device):
        q = q.to(dtype)
        if normalize:
            q = F.normalize(q, dim=1)  # queries: (N, C)
        q = q / T
        logits = [(q * k.to(dtype)).sum(dim=1, keepdim=True)]  # l_pos "nc,nc->n": (N, 1)
        for neg in (n.to(dtype) for n in parts):  # l_neg: "nc,ck->nk" or "nc,nkc->nk", (N, K_i)
            logits.append(torch.mm(q, neg) if neg.dim() == 2 else torch.einsum("nc,nkc->nk", q, neg))
        logits = torch.cat(logits, dim=1)  # (N, 1+K), already divided by T
    return logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)


def infonce_loss(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, T: float = 0.07) -> torch.Tensor:
    """``-log softmax(logits)[0]`` averaged over the batch; see :func:`infonce_logits`.

    With uninformative features (all candidates equally similar) the loss is exactly ln(K + 1),
    and ``ln(K + 1) - L`` is the InfoNCE lower bound on the mutual information I(q; k).

    Raises:
        ValueError: as :func:`infonce_logits`, or no negatives (K = 0: the loss would be 0 whatever the features).
    """
    logits, labels = infonce_logits(q, k, negatives, T)
    _check_some_negatives(logits.shape[1] - 1)
    return F.cross_entropy(logits, labels)


def nce_loss(logits: torch.Tensor, num_samples: int, Z: float | torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """NCE loss of Wu et al. (2018) for instance discrimination with a memory bank.

    The model's probability of the true instance is ``P(i|v) = exp(logit) / Z``; noise is
    uniform, ``Pn = 1 / M``; with K noise samples per positive the posterior that a pair
    comes from the data is ``h = P / (P + K·Pn)``, and
    ``L = -log h(pos) - Σ_noise log(1 - h(neg))`` (summed over noise, averaged over the batch).

    Shape:
        logits: (N, 1+K), already divided by the temperature, positive at index 0.

    Raises:
        ValueError: ``num_samples`` < 1, a non-positive ``Z``, or logits without negatives (K = 0).
    """
    if int(num_samples) < 1:
        raise ValueError(f"num_samples (the memory-bank size M) must be >= 1, got {num_samples}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, 1+K), got {tuple(logits.shape)}")
    _check_some_negatives(logits.shape[1] - 1)
    Z = torch.as_tensor(Z, dtype=logits.dtype, device=logits.device)
    if not bool(Z > 0):
        raise ValueError(f"the normalising constant Z must be > 0, got {float(Z)}")
    K = logits.shape[1] - 1
    P = torch.exp(logits) / Z  # (N, 1+K)
    noise = K / num_samples  # K · Pn
    log_h_pos = torch.log(P[:, 0] / (P[:, 0] + noise + eps))  # (N,)
    log_1_minus_h_neg = torch.log(noise / (P[:, 1:] + noise + eps))  # (N, K)
    return -(log_h_pos + log_1_minus_h_neg.sum(dim=1)).mean()


class NCECriterion(nn.Module):
    """NCE loss with Z estimated once, from the first batch, as in Wu et al. (2018).

    ``Z ≈ M · mean(exp(logits))`` over the first batch's candidates, then kept fixed
    (a buffer, so it is saved in checkpoints).

    Args:
        num_samples: the memory-bank size M (number of training instances).
    """

    def __init__(self, num_samples: int):
        super().__init__()
        if int(num_samples) < 1:
            raise ValueError(f"num_samples (the memory-bank size M) must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.register_buffer("Z", torch.tensor(-1.0))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.Z.item() < 0:
            with torch.no_grad():
                self.Z.fill_(float(torch.exp(logits.detach().float()).mean() * self.num_samples))
        return nce_loss(logits, self.num_samples, self.Z)


def debiased_infonce_loss(logits: torch.Tensor, tau_plus: float, T: float) -> torch.Tensor:
    """Debiased contrastive loss of Chuang et al. (2020, "Debiased Contrastive Learning", arXiv 2007.00224).

    Some "negatives" share the query's class (false negatives). With class prior τ⁺ (the
    probability that a random negative is of the same class), the sum over negatives is
    corrected by subtracting the expected contribution of same-class samples, estimated
    with the positive:

    ``Ng = max((−τ⁺·K·pos + Σ neg) / (1 − τ⁺), K·e^{−1/T})``, ``L = −log(pos / (pos + Ng))``,

    with ``pos = exp(q·k/T)`` and ``neg = exp(q·n/T)``, averaged over the batch. The clamp
    keeps ``Ng`` at least its theoretical minimum (every negative at cosine −1). With
    τ⁺ = 0 and the clamp inactive it is the usual InfoNCE cross-entropy.

    The computation is done in a shifted space (each row's largest logit subtracted), which
    leaves the ratio unchanged and avoids overflow at small T.

    Args:
        logits: MoCo logits already divided by T, positive at index 0, then K negatives.
        tau_plus: class prior τ⁺ in [0, 1).
        T: the temperature the logits were divided by (> 0), used for the clamp ``e^{−1/T}``.

    Shape:
        logits: (N, 1+K). Returns a scalar.

    Raises:
        ValueError: τ⁺ outside [0, 1), T ≤ 0, or logits not (N, 1+K) with K ≥ 1.
    """
    z, pos, ng, _ = debiased_negative_term(logits, tau_plus, T)
    return (torch.log(pos + ng) - z[:, 0]).mean()


def debiased_negative_term(logits: torch.Tensor, tau_plus: float, T: float):
    """The corrected negative term ``Ng`` of :func:`debiased_infonce_loss`, and where the clamp set it.

    When the positive is much more similar to the query than the negatives are (two views of one
    image, a low T), ``τ⁺·K·pos`` can exceed ``Σ neg``: the correction then removes more than the
    whole negative term, ``Ng`` sits at its floor ``K·e^{−1/T}``, and the negatives no longer push.
    ``clamped`` shows for which queries that happened.

    Args:
        logits, tau_plus, T: as :func:`debiased_infonce_loss`.

    Shape:
        logits: (N, 1+K) -> ``(z, pos, ng, clamped)``: z (N, 1+K) the logits minus each row's
        largest; pos (N,) ``exp(z[:, 0])`` and ng (N,) in that shifted space; clamped (N,) bool.

    Raises:
        ValueError: as :func:`debiased_infonce_loss`.
    """
    T = check_temperature(T)
    tau_plus = in_range(tau_plus, "tau_plus (the class prior τ⁺)", 0.0, 1.0, high_open=True)
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (N, 1+K) with K >= 1 negatives, got {tuple(logits.shape)}")
    K = logits.shape[1] - 1
    shift = logits.detach().max(dim=1, keepdim=True).values  # (N, 1)
    z = logits - shift  # (N, 1+K)
    pos = z[:, 0].exp()  # (N,)
    neg = z[:, 1:].exp()  # (N, K)
    ng = (-tau_plus * K * pos + neg.sum(dim=1)) / (1.0 - tau_plus)  # (N,)
    floor = K * torch.exp(-1.0 / T - shift[:, 0])  # (N,), K·e^{−1/T} in the shifted space
    clamped = ng.detach() <= floor
    return z, pos, torch.maximum(ng, floor), clamped

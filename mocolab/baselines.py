"""The models MoCo is compared with: margin pairs, end-to-end, memory bank.

Letters: N batch size, C feature dim, K negatives per query, M memory-bank size.

- :class:`MarginPairs`: a siamese encoder trained with the margin contrastive loss of
  Hadsell, Chopra & LeCun (2006) on N positive and N negative pairs per batch (notebook 01).
- :class:`EndToEnd`: keys from the current batch, through the same encoder, with gradients
  (the MoCo paper's end-to-end mechanism; SimCLR's one-directional form).
- :class:`MemoryBankModel`: instance discrimination with a memory bank (InsDis, Wu et al. 2018).

All three have the training interface of :class:`~mocolab.interface.ContrastiveModel`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .checks import positive_int
from .encoders import add_mlp_head
from .interface import ContrastiveModel
from .losses import NCECriterion, check_temperature, margin_loss_of_distances
from .memory_bank import MemoryBank

__all__ = ["MarginPairs", "EndToEnd", "MemoryBankModel"]


class MarginPairs(ContrastiveModel):
    """Siamese encoder trained with the margin contrastive loss on N positive and N negative pairs per batch.

    ``z_q = normalize(encoder(im_q))``, ``z_k = normalize(encoder(im_k))``: (N, C) unit vectors. Pair i
    (positive) is ``(z_q[i], z_k[i])``, pair N + i (negative) ``(z_q[i], z_k[i − 1])``: each view 1 against the
    view 2 of the previous image. ``forward`` returns the scores of all N × N pairs, minus their squared
    distances ``−‖z_q[i] − z_k[j]‖²``, with labels ``arange(N)`` (``fit``'s pretext accuracy: is my own other
    view the nearest one?); :meth:`loss` reads the 2N pairs' distances from them.

    Args:
        base_encoder: ``base_encoder(num_classes=dim)``, e.g. :class:`~mocolab.encoders.ConvNet`.
        dim: C, the embedding dimension.
        margin: a negative pair stops pushing once its distance reaches ``margin`` (> 0).

    Shape:
        forward(im_q (N, 3, H, W), im_k (N, 3, H, W)) -> logits (N, N), labels (N,).
    """

    def __init__(self, base_encoder: Callable[..., nn.Module], dim: int = 128, margin: float = 1.0):
        super().__init__()
        if not margin > 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        self.encoder_q = base_encoder(num_classes=dim)
        self.margin = float(margin)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, index: torch.Tensor | None = None):
        z_q = F.normalize(self.encoder_q(im_q), dim=1)  # (N, C)
        z_k = F.normalize(self.encoder_q(im_k), dim=1)  # (N, C)
        logits = -(z_q[:, None, :] - z_k[None, :, :]).pow(2).sum(dim=2)  # (N, N): −D², own view on the diagonal
        return logits, torch.arange(logits.shape[0], device=logits.device)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The margin loss of the N positive pairs (the labels' columns) and the N negative pairs (the previous
        image's view 2), averaged over the 2N pairs."""
        rows = torch.arange(logits.shape[0], device=logits.device)
        d2 = -torch.cat([logits[rows, labels], logits[rows, labels.roll(1)]])  # (2N,): positives, then negatives
        y = torch.cat([torch.zeros_like(labels), torch.ones_like(labels)])  # 0: similar pair, 1: dissimilar
        return margin_loss_of_distances(d2, y, self.margin)


class EndToEnd(ContrastiveModel):
    """The end-to-end baseline: keys from the current batch, through the same encoder, with gradients.

    Negatives are the other samples' keys in the batch, so the dictionary size is the batch
    size N (the MoCo paper's end-to-end mechanism; SimCLR's one-directional form).

    Returns from ``forward``: logits (N, N) / T with the positive on the diagonal, labels ``arange(N)``.
    """

    def __init__(self, base_encoder: Callable[..., nn.Module], dim: int = 128, T: float = 0.07, mlp: bool = False):
        super().__init__()
        self.T = check_temperature(T)
        self.encoder_q = base_encoder(num_classes=dim)
        if mlp:
            add_mlp_head(self.encoder_q)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, index: torch.Tensor | None = None):
        q = F.normalize(self.encoder_q(im_q), dim=1)  # (N, C)
        k = F.normalize(self.encoder_q(im_k), dim=1)  # (N, C), gradients flow into the keys too
        logits = torch.einsum("nc,mc->nm", q, k) / self.T  # (N, N)
        return logits, torch.arange(logits.shape[0], device=logits.device)


class MemoryBankModel(ContrastiveModel):
    """Instance discrimination with a memory bank (InsDis, Wu et al. 2018).

    The positive for sample i is its bank entry, the negatives are K entries drawn
    uniformly from the bank. After the logits are computed the bank is updated with the
    fresh query features. Only ``im_q`` is encoded; ``index`` is required.

    Args:
        num_samples: M, the number of training samples.
        K: negatives per query (Wu et al.: 4096).
        bank_m: momentum of the bank update (0.5 in the paper).
        loss: ``"nce"`` (NCE with Z estimated once, the paper) or ``"softmax"`` (full cross-entropy);
            kept as ``loss_type``.
    """

    def __init__(self, base_encoder: Callable[..., nn.Module], num_samples: int, dim: int = 128, K: int = 4096,
                 T: float = 0.07, bank_m: float = 0.5, loss: str = "softmax", mlp: bool = False):
        super().__init__()
        if loss not in ("nce", "softmax"):
            raise ValueError(f"loss must be 'nce' or 'softmax', got {loss!r}")
        K = positive_int(K, "K (negatives per query)")
        self.T, self.K, self.loss_type = check_temperature(T), K, loss
        self.encoder_q = base_encoder(num_classes=dim)
        if mlp:
            add_mlp_head(self.encoder_q)
        self.bank = MemoryBank(num_samples, dim, m=bank_m)
        self.nce = NCECriterion(num_samples)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor | None = None, index: torch.Tensor | None = None):
        if index is None:
            raise ValueError("MemoryBankModel needs the dataset indices of the batch (index=...)")
        q = F.normalize(self.encoder_q(im_q), dim=1)  # (N, C)
        with torch.no_grad():
            neg_idx = self.bank.sample(index, self.K)  # (N, K)
            weights = self.bank(torch.cat([index[:, None], neg_idx], dim=1))  # (N, 1+K, C)
        logits = torch.einsum("nc,nkc->nk", q, weights) / self.T  # (N, 1+K)
        self.bank.update(index, q)
        return logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.nce(logits) if self.loss_type == "nce" else F.cross_entropy(logits, labels)

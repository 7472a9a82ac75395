"""Momentum Contrast (He et al. 2020, arXiv 1911.05722), and the two baselines it is compared with.

Letters: N batch size, C feature dim (``dim``), K queue size, M memory-bank size.

:class:`MoCo` is a drop-in for ``moco.builder.MoCo`` of facebookresearch/moco:
the same constructor, attributes ``encoder_q`` / ``encoder_k``, buffers
``queue`` (C, K) and ``queue_ptr``, and ``forward(im_q, im_k) -> (logits, labels)``.
With one process and shuffle-BN off it computes exactly what the official builder
computes. It also runs on a CPU or one GPU, accepts any K (the queue wraps
around), validates its arguments, computes the logits in fp32 under bf16 autocast,
and makes no device -> host sync in a step.

:class:`EndToEnd` (negatives from the current batch, keys through the same
encoder with gradients) and :class:`MemoryBankModel` (InsDis, Wu et al. 2018)
share the training interface::

    logits, labels = model(im_q, im_k, index=index)
    loss = model.criterion(logits, labels)
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import add_mlp_head
from .losses import NCECriterion, check_temperature
from .memory_bank import MemoryBank
from .momentum import MOMENTUM_SCHEDULES, MomentumUpdater, check_momentum
from .queue import KeyQueue, check_positive_int
from .shuffle_bn import batch_shuffle, batch_unshuffle, concat_all_gather, convert_split_bn, world_size

__all__ = ["MoCo", "EndToEnd", "MemoryBankModel", "SHUFFLE_BN_MODES"]

SHUFFLE_BN_MODES = ("auto", "off", "split", "ddp")


def _autocast_off(device: torch.device):
    """A context that turns autocast off on ``device`` (nothing where autocast does not exist)."""
    available = getattr(torch.amp, "is_autocast_available", lambda kind: kind in ("cpu", "cuda"))  # torch < 2.4
    if available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class MoCo(KeyQueue):
    """MoCo: a query encoder, a momentum key encoder and a queue of keys.

    MoCo owns its queue directly (buffers ``queue`` and ``queue_ptr`` at the top level,
    the official names), so it extends :class:`~mocolab.queue.KeyQueue` rather than holding one.

    Args:
        base_encoder: a callable ``base_encoder(num_classes=dim)`` returning a module with a
            final ``nn.Linear`` called ``fc`` (a torchvision ResNet, :class:`~mocolab.encoders.ConvNet`, …).
        dim: C, feature dimension (default 128).
        K: queue size, any positive integer (default 65536; 2.0 is taken as 2, 2.5 is refused).
        m: momentum of the key encoder, in [0, 1] (default 0.999).
        T: softmax temperature > 0 (default 0.07).
        mlp: MoCo v2's MLP head (default False).
        shuffle_bn: ``"auto"`` (``"ddp"`` under a process group of several ranks, else
            ``"off"``: the official behaviour), ``"off"``, ``"split"`` (SplitBatchNorm with
            ``bn_splits`` groups and keys shuffled within the batch, the CIFAR-10 demo's way)
            or ``"ddp"`` (keys shuffled across ranks).
        bn_splits: groups for ``shuffle_bn="split"``.
        shuffle_keys: with ``shuffle_bn="split"`` or ``"ddp"``, shuffle the keys across BN groups
            (default True, the official behaviour). False keeps each key in the same BN group as its
            query: the ablation that lets BatchNorm statistics leak the positive.
        symmetric: symmetric loss (the CIFAR-10 demo): both views act as query and as key;
            ``forward`` returns 2N rows and :meth:`criterion` returns ``loss_12 + loss_21``.
        queue_init: ``"random"`` (random unit keys, official) or ``"empty"`` (only real keys act as negatives).
        momentum_schedule: ``"constant"`` (official) or ``"cosine"`` (m rises to 1 over training;
            call :meth:`set_progress` each step).
        momentum_buffers: also average BN running statistics into the key encoder (official: False).

    Raises:
        ValueError: any argument outside its allowed range (the message says which and what is allowed);
            in ``forward``, im_q and im_k of different shapes, or an encoder output that is not (N, dim).
    """

    def __init__(self, base_encoder: Callable[..., nn.Module], dim: int = 128, K: int = 65536, m: float = 0.999,
                 T: float = 0.07, mlp: bool = False, *, shuffle_bn: str = "auto", bn_splits: int = 8,
                 symmetric: bool = False, queue_init: str = "random", momentum_schedule: str = "constant",
                 momentum_buffers: bool = False, shuffle_keys: bool = True):
        super().__init__(dim, K, init=queue_init)
        self.m = self.base_m = check_momentum(m)
        self.T = check_temperature(T)
        if shuffle_bn not in SHUFFLE_BN_MODES:
            raise ValueError(f"shuffle_bn must be one of {SHUFFLE_BN_MODES}, got {shuffle_bn!r}")
        if momentum_schedule not in MOMENTUM_SCHEDULES:
            raise ValueError(f"momentum_schedule must be one of {tuple(MOMENTUM_SCHEDULES)}, got {momentum_schedule!r}")
        if shuffle_bn == "split":
            bn_splits = check_positive_int(bn_splits, "bn_splits")
        self.shuffle_bn, self.bn_splits = shuffle_bn, int(bn_splits)
        self.shuffle_keys = bool(shuffle_keys)
        self.symmetric, self.momentum_schedule = bool(symmetric), momentum_schedule

        self.encoder_q = base_encoder(num_classes=dim)
        if mlp:
            add_mlp_head(self.encoder_q)
        if shuffle_bn == "split":
            convert_split_bn(self.encoder_q, self.bn_splits)
        self.encoder_k = copy.deepcopy(self.encoder_q)  # same initialisation, as param_k.copy_(param_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.momentum_buffers = bool(momentum_buffers)
        self._momentum = MomentumUpdater(self.encoder_k, self.encoder_q, buffers=self.momentum_buffers)

    # -- the key encoder ------------------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() may replace tensors: gather them again
        out = super()._apply(fn, *args, **kwargs)
        if hasattr(self, "_momentum"):
            self._momentum = MomentumUpdater(self.encoder_k, self.encoder_q, buffers=self.momentum_buffers)
        return out

    def set_progress(self, step: int, total_steps: int) -> float:
        """Set m for ``step`` of ``total_steps`` from the momentum schedule; returns the new m."""
        self.m = MOMENTUM_SCHEDULES[self.momentum_schedule](self.base_m, step, total_steps)
        return self.m

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """θk ← m·θk + (1 − m)·θq, fused and in place."""
        self._momentum(self.m)

    def _shuffle_mode(self) -> str:
        if self.shuffle_bn == "auto":
            return "ddp" if world_size() > 1 else "off"
        return self.shuffle_bn

    def _embed_k(self, im: torch.Tensor) -> torch.Tensor:
        """Unit keys of a batch through the key encoder (as it is), in at least fp32. (N, C)."""
        k = self.encoder_k(im)
        if k.dim() != 2 or k.shape[1] != self.queue.shape[0]:
            raise ValueError(f"the encoder's output has shape {tuple(k.shape)}, but MoCo expects (N, dim) = "
                             f"({im.shape[0]}, {self.queue.shape[0]}): build it with num_classes=dim")
        return F.normalize(k.to(torch.promote_types(k.dtype, torch.float32)), dim=1)

    @torch.no_grad()
    def _keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """Keys of a batch through the key encoder, with shuffle-BN as configured. (N, C), unit norm."""
        mode = self._shuffle_mode()
        if mode == "off" or not self.shuffle_keys:
            return self._embed_k(im_k)
        if mode == "split":  # shuffle within the batch (one device)
            idx_shuffle = torch.randperm(im_k.shape[0], device=im_k.device)
            k = self._embed_k(im_k[idx_shuffle])
            return k[torch.argsort(idx_shuffle)]
        im_k, idx_unshuffle = batch_shuffle(im_k)  # across ranks
        return batch_unshuffle(self._embed_k(im_k), idx_unshuffle)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Gather keys from all ranks and write them into the queue (wraps around any K)."""
        keys = concat_all_gather(keys)
        if index is not None:
            index = concat_all_gather(index)
        self.enqueue(keys, index)

    def _contrast(self, im_q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        q = self.encoder_q(im_q)  # (N, C), bf16 under autocast
        dtype = torch.promote_types(torch.promote_types(q.dtype, negatives.dtype), torch.float32)
        with _autocast_off(q.device):  # the contrast in fp32: bf16 would round logits / T in steps of 1/16
            q = F.normalize(q.to(dtype), dim=1)  # queries: (N, C)
            # dividing q by T (N·C values) instead of the logits (N·(1+K) values) saves a pass over
            # the largest tensor of the step, forward and backward; the logits are the same
            q = q / self.T
            l_pos = (q * k.to(dtype)).sum(dim=1, keepdim=True)  # "nc,nc->n": (N, 1)
            l_neg = torch.mm(q, negatives.to(dtype))  # "nc,ck->nk": (N, K)
            return torch.cat([l_pos, l_neg], dim=1)  # (N, 1+K), already divided by T

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, index: torch.Tensor | None = None):
        """One MoCo step: logits and labels, then the momentum update and the enqueue.

        No value is read on the host: the step makes no device -> host sync.

        Args:
            im_q: a batch of query images, (N, 3, H, W).
            im_k: a batch of key images (the other view), (N, 3, H, W).
            index: optional dataset indices (N,), recorded beside the keys in the queue.

        Returns:
            ``(logits, labels)``: logits (N, 1+K) already divided by T (2N rows when symmetric), labels all zeros.

        Raises:
            ValueError: im_q and im_k of different shapes, an index that is not (N,), or an encoder
                output that is not (N, dim).
        """
        if im_q.shape != im_k.shape:
            raise ValueError(f"im_q and im_k must have the same shape, got im_q {tuple(im_q.shape)} "
                             f"and im_k {tuple(im_k.shape)}")
        if index is not None and tuple(index.shape) != (im_q.shape[0],):
            raise ValueError(f"index must have shape ({im_q.shape[0]},) for images {tuple(im_q.shape)}, "
                             f"got {tuple(index.shape)}")
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k = self._keys(im_k)  # keys: (N, C)
            k1 = self._keys(im_q) if self.symmetric else None
        # the queue is overwritten in place below, after autograd saved the negatives for the
        # backward of l_neg: with gradients on they must be a copy (in at least fp32), not a view
        negatives = self.negatives()  # (C, K)
        negatives = negatives.to(torch.promote_types(negatives.dtype, torch.float32), copy=torch.is_grad_enabled())
        logits = self._contrast(im_q, k, negatives)
        if self.symmetric:
            logits = torch.cat([logits, self._contrast(im_k, k1, negatives)], dim=0)  # (2N, 1+K)
            keys = torch.cat([k1, k], dim=0)
            index = torch.cat([index, index]) if index is not None else None
        else:
            keys = k
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(keys, index)
        return logits, labels

    def criterion(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the 1 + K candidates (``loss_12 + loss_21`` when symmetric, as the CIFAR-10 demo)."""
        loss = F.cross_entropy(logits, labels)
        return 2.0 * loss if self.symmetric else loss


class EndToEnd(nn.Module):
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

    def criterion(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels)


class MemoryBankModel(nn.Module):
    """Instance discrimination with a memory bank (InsDis, Wu et al. 2018).

    The positive for sample i is its bank entry, the negatives are K entries drawn
    uniformly from the bank. After the logits are computed the bank is updated with the
    fresh query features. Only ``im_q`` is encoded; ``index`` is required.

    Args:
        num_samples: M, the number of training samples.
        K: negatives per query (Wu et al.: 4096).
        bank_m: momentum of the bank update (0.5 in the paper).
        loss: ``"nce"`` (NCE with Z estimated once, the paper) or ``"softmax"`` (full cross-entropy).
    """

    def __init__(self, base_encoder: Callable[..., nn.Module], num_samples: int, dim: int = 128, K: int = 4096,
                 T: float = 0.07, bank_m: float = 0.5, loss: str = "softmax", mlp: bool = False):
        super().__init__()
        if loss not in ("nce", "softmax"):
            raise ValueError(f"loss must be 'nce' or 'softmax', got {loss!r}")
        K = check_positive_int(K, "K (negatives per query)")
        self.T, self.K, self.loss = check_temperature(T), K, loss
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

    def criterion(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.nce(logits) if self.loss == "nce" else F.cross_entropy(logits, labels)

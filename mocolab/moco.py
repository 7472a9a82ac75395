"""Momentum Contrast (He et al. 2020, arXiv 1911.05722): the whole MoCo step, in one place.

Letters: N batch size, C feature dim (``dim``), K queue size.

:class:`MoCo` is a drop-in for ``moco.builder.MoCo`` of facebookresearch/moco:
the same constructor, attributes ``encoder_q`` / ``encoder_k``, buffers
``queue`` (C, K) and ``queue_ptr``, and ``forward(im_q, im_k) -> (logits, labels)``.
With one process and shuffle-BN off it computes exactly what the official builder
computes. It also runs on a CPU or one GPU, accepts any K (the queue wraps
around), validates its arguments, computes the logits in fp32 under bf16 autocast,
and makes no device -> host sync in a step.

One step (:meth:`MoCo.forward`) reads top to bottom: the momentum update of the key encoder
(:mod:`mocolab.momentum`), the keys through shuffle-BN (:mod:`mocolab.shuffle_bn`), the logits
(:func:`mocolab.losses.infonce_logits`, the one function that computes them), the enqueue
(:mod:`mocolab.queue`). MoCo has the training interface of :class:`~mocolab.interface.ContrastiveModel`;
the models it is compared with are in :mod:`mocolab.baselines`, its variants in :mod:`mocolab.hard_negatives`.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .checks import positive_int as check_positive_int
from .distributed import concat_all_gather, world_size
from .encoders import add_mlp_head
from .interface import ContrastiveModel
from .losses import check_temperature, infonce_logits
from .momentum import MOMENTUM_SCHEDULES, MomentumUpdater, check_momentum, freeze, momentum_at
from .queue import KeyQueue
from .shuffle_bn import SHUFFLE_BN_MODES, batch_shuffle, batch_unshuffle, convert_split_bn

__all__ = ["MoCo", "SHUFFLE_BN_MODES"]


class MoCo(ContrastiveModel, KeyQueue):
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
            ``forward`` returns 2N rows and :meth:`loss` returns ``loss_12 + loss_21``.
        queue_init: ``"random"`` (random unit keys, official) or ``"empty"`` (only real keys act as negatives).
        momentum_schedule: ``"constant"`` (official) or ``"cosine"`` (m rises to 1 over training;
            call :meth:`set_progress` each step, as ``fit`` does).
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
        self.encoder_k = freeze(copy.deepcopy(self.encoder_q))  # same initialisation, as param_k.copy_(param_q)
        self.momentum_buffers = bool(momentum_buffers)
        self._momentum = MomentumUpdater(self.encoder_k, self.encoder_q, buffers=self.momentum_buffers)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, index: torch.Tensor | None = None):
        """One MoCo step: the momentum update, the keys, the logits, then the enqueue.

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
        self._check_batch(im_q, im_k, index)
        with torch.no_grad():  # no gradient to keys
            self._momentum_update_key_encoder()  # update the key encoder
            k = self._keys(im_k)  # keys: (N, C), unit length, through shuffle-BN
            k1 = self._keys(im_q) if self.symmetric else None  # symmetric: each view is also the other's key
        negatives = self._queue_negatives()  # (C, K)
        logits = self.contrast(self.encoder_q(im_q), k, negatives, index)  # (N, 1+K), divided by T
        if self.symmetric:
            logits = torch.cat([logits, self.contrast(self.encoder_q(im_k), k1, negatives, index)])  # (2N, 1+K)
            k, index = torch.cat([k1, k]), None if index is None else torch.cat([index, index])
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # positives: column 0
        self._dequeue_and_enqueue(k, index)
        return logits, labels

    def contrast(self, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor,
                 index: torch.Tensor | None = None) -> torch.Tensor:
        """The logits of one view's queries: :func:`~mocolab.losses.infonce_logits` of the normalised ``q``.

        The variants of :mod:`mocolab.hard_negatives` override this to change the negatives.

        Args:
            q: the query encoder's output, (N, C) (normalised here, in fp32).
            k: the positive keys, (N, C), unit length.
            negatives: the queue's keys, (C, K).
            index: the batch's dataset indices (N,), or None.

        Returns:
            logits (N, 1+K), divided by T, the positive in column 0.
        """
        return infonce_logits(q, k, negatives, self.T, normalize=True)[0]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the 1 + K candidates (``loss_12 + loss_21`` when symmetric, as the CIFAR-10 demo)."""
        loss = F.cross_entropy(logits, labels)
        return 2.0 * loss if self.symmetric else loss

    def criterion(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The former name of :meth:`loss`, kept for one release."""
        return self.loss(logits, labels)

    def set_progress(self, step: int, total_steps: int) -> float:
        """Set m for ``step`` of ``total_steps`` from the momentum schedule; returns the new m."""
        self.m = momentum_at(self.momentum_schedule, self.base_m, step, total_steps)
        return self.m

    def compile_encoders(self) -> None:
        """``Module.compile`` both encoders, in place."""
        self.encoder_q.compile()
        self.encoder_k.compile()

    # -- the parts of a step -------------------------------------------------------------
    def _check_batch(self, im_q: torch.Tensor, im_k: torch.Tensor, index: torch.Tensor | None) -> None:
        if im_q.shape != im_k.shape:
            raise ValueError(f"im_q and im_k must have the same shape, got im_q {tuple(im_q.shape)} "
                             f"and im_k {tuple(im_k.shape)}")
        if index is not None and tuple(index.shape) != (im_q.shape[0],):
            raise ValueError(f"index must have shape ({im_q.shape[0]},) for images {tuple(im_q.shape)}, "
                             f"got {tuple(index.shape)}")

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """θk ← m·θk + (1 − m)·θq, fused and in place."""
        self._momentum(self.m)

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() may replace tensors: gather them again
        out = super()._apply(fn, *args, **kwargs)
        if hasattr(self, "_momentum"):
            self._momentum = MomentumUpdater(self.encoder_k, self.encoder_q, buffers=self.momentum_buffers)
        return out

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

    def _queue_negatives(self) -> torch.Tensor:
        """The queue's keys that act as negatives, (C, K), in at least fp32.

        The enqueue overwrites the queue in place after autograd saved the negatives for the
        backward of the logits: with gradients on they must be a copy, not a view.
        """
        negatives = self.negatives()
        return negatives.to(torch.promote_types(negatives.dtype, torch.float32), copy=torch.is_grad_enabled())

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Gather keys from all ranks and write them into the queue (wraps around any K)."""
        keys = concat_all_gather(keys)
        if index is not None:
            index = concat_all_gather(index)
        self.enqueue(keys, index)

"""Contrastive representation distillation (CRD, Tian, Krishnan & Isola 2020, ICLR, arXiv 1910.10699).

Letters: N batch size, C feature dim (the teacher's embedding), K queue size.

A small *student* learns to reproduce a trained *teacher*'s representation.
Plain feature regression pulls the student's feature of an image to the teacher's
feature of the same image and nothing else. CRD also *pushes* it away from the
teacher's features of other images: an InfoNCE loss with the student's output as
the query, the teacher's output for the same image as the positive key, and
teacher keys of earlier images (a queue, as in MoCo) as negatives. The contrastive
objective transfers the teacher's *relations* between images (which ones are
close), not only each point.

The teacher is frozen, so it is MoCo's key encoder at momentum m = 1: the queue's
keys never go stale. :class:`ContrastiveDistill` has the shared training interface,
so :func:`mocolab.train.fit` trains it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .interface import ContrastiveModel
from .losses import check_temperature, infonce_logits
from .momentum import freeze
from .queue import KeyQueue

__all__ = ["ContrastiveDistill", "DISTILL_LOSSES"]

DISTILL_LOSSES = ("crd", "l2")


class ContrastiveDistill(ContrastiveModel, KeyQueue):
    """Distil a frozen teacher into a student, contrastively (CRD) or by feature regression (L2).

    Both losses see the same logits: ``q = normalize(student(x))``, ``k = normalize(teacher(x))``
    for the same image x, and the queue of earlier teacher keys as negatives; logits
    (N, 1+K) = ``[q·k, q·queue] / T``, positive at index 0.

    - ``loss="crd"``: InfoNCE (cross-entropy over the 1 + K candidates): pull to k, push from the queue.
    - ``loss="l2"``: ``‖q − k‖² = 2 − 2 q·k``, recovered from the positive logit (``2 − 2·T·logits[:, 0]``);
      the negatives are only monitored (pretext accuracy), they get no gradient.

    Args:
        student: module mapping images to (N, C); it becomes ``encoder_q`` (trained, and
            what the kNN monitor of :func:`~mocolab.train.fit` evaluates).
        teacher: module mapping images to (N, C); it becomes ``encoder_k``, frozen and kept in
            eval mode (its BN statistics do not move) even when the model is put in training mode.
        dim: C, the output dimension shared by both (checked on the first batch).
        K: queue size (teacher keys of earlier images).
        T: temperature > 0.
        loss: ``"crd"`` or ``"l2"`` (kept as ``loss_type``).
        teacher_view: ``"same"`` (the teacher sees the student's input ``im_q``, as in CRD) or
            ``"other"`` (the teacher sees the second crop ``im_k``).
        queue_init: ``"random"`` or ``"empty"`` (see :class:`~mocolab.queue.KeyQueue`).

    Shape:
        forward(im_q (N, 3, H, W), im_k (N, 3, H, W)) -> logits (N, 1+K), labels (N,) zeros.

    Raises:
        ValueError: a bad argument, or student / teacher outputs that are not (N, dim).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, dim: int = 128, K: int = 4096, T: float = 0.07, *,
                 loss: str = "crd", teacher_view: str = "same", queue_init: str = "random"):
        if loss not in DISTILL_LOSSES:
            raise ValueError(f"loss must be one of {DISTILL_LOSSES}, got {loss!r}")
        if teacher_view not in ("same", "other"):
            raise ValueError(f"teacher_view must be 'same' or 'other', got {teacher_view!r}")
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise ValueError("student and teacher must be torch.nn.Module instances")
        super().__init__(dim, K, init=queue_init)
        self.T, self.loss_type, self.teacher_view = check_temperature(T), loss, teacher_view
        self.encoder_q = student
        self.encoder_k = freeze(teacher)
        self.encoder_k.eval()

    def train(self, mode: bool = True):
        """Set training mode for the student only; the teacher always stays in eval mode."""
        super().train(mode)
        self.encoder_k.eval()
        return self

    def compile_encoders(self) -> None:
        """``Module.compile`` the student and the teacher, in place."""
        self.encoder_q.compile()
        self.encoder_k.compile()

    def _check(self, z: torch.Tensor, who: str, n: int) -> None:
        if z.dim() != 2 or z.shape != (n, self.queue.shape[0]):
            raise ValueError(f"the {who} must output (N, dim) = ({n}, {self.queue.shape[0]}), got {tuple(z.shape)}; "
                             f"build it with num_classes=dim")

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor | None = None, index: torch.Tensor | None = None):
        """One step: student queries, teacher keys, logits against the queue, then the enqueue.

        Returns:
            ``(logits, labels)``: logits (N, 1+K) already divided by T, labels zeros.
        """
        x_t = im_q if self.teacher_view == "same" else im_k
        if x_t is None:
            raise ValueError("teacher_view='other' needs im_k (the second crop)")
        n = im_q.shape[0]
        with torch.no_grad():
            k = self.encoder_k(x_t)
            self._check(k, "teacher", n)
            k = F.normalize(k.float(), dim=1)  # (N, C)
        q = self.encoder_q(im_q)
        self._check(q, "student", n)
        logits, labels = infonce_logits(q, k, self.negatives().clone(), self.T, normalize=True)  # (N, 1+K)
        self.enqueue(k, index)
        return logits, labels

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CRD: cross-entropy over the 1 + K candidates; L2: mean ‖q − k‖² from the positive logit."""
        if self.loss_type == "crd":
            return F.cross_entropy(logits, labels)
        return (2.0 - 2.0 * self.T * logits[:, 0]).mean()

"""The one training interface of mocolab: what :func:`mocolab.train.fit` asks of a model.

Letters: N batch size.

Every model of the course (:class:`~mocolab.moco.MoCo`, the baselines, the MoCo variants, CMC,
the distillers) subclasses :class:`ContrastiveModel`, and ``fit`` calls nothing else::

    model.set_progress(step, total_steps)               # before every step (schedules)
    logits, labels = model(im_q, im_k, index=index)     # one step's scores, positives at labels
    loss = model.loss(logits, labels)                   # what the optimiser minimises
    features = model.eval_encoder()(images)             # what the kNN monitor evaluates
    model.compile_encoders()                            # TrainConfig(compile=True)
    model.trained_encoders                              # what DistributedDataParallel wraps

``forward`` returns everything ``loss`` needs: a model does not pass data from one to the
other through hidden attributes. All training state (queues, step counters, centroids) lives
in buffers, so ``state_dict`` holds it and a resumed run continues where it stopped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ContrastiveModel", "unwrap"]


def unwrap(module: nn.Module) -> nn.Module:
    """``module`` itself, not through ``DistributedDataParallel`` (which :func:`mocolab.train.fit` may wrap it in)."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


class ContrastiveModel(nn.Module):
    """Base class of the models that :func:`mocolab.train.fit` trains.

    Subclasses implement :meth:`forward`; the other methods have defaults: :meth:`loss` is the
    cross-entropy, :meth:`set_progress` does nothing, :meth:`eval_encoder` and
    :meth:`compile_encoders` use the query encoder ``encoder_q`` (the official name), and
    :attr:`trained_encoders` names it.
    """

    #: The names of the submodules that gradients train (the others move by momentum, or not at all).
    #: With several processes ``fit`` wraps each in ``DistributedDataParallel``
    #: (:func:`mocolab.distributed.wrap_trained_encoders`), so that their gradients are averaged over ranks.
    trained_encoders: tuple[str, ...] = ("encoder_q",)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, index: torch.Tensor | None = None):
        """One training step's scores.

        Args:
            im_q, im_k: two views of a batch of images, (N, 3, H, W) each.
            index: the batch's dataset indices (N,), for models that keep per-sample state.

        Returns:
            ``(logits, labels)``: logits (rows, candidates), one row per query; ``labels`` (rows,) the column of
            each row's positive (``fit``'s pretext accuracy is ``argmax(logits) == labels``).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement forward(im_q, im_k, index=None)")

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of one step's ``forward`` output (default: cross-entropy)."""
        return F.cross_entropy(logits, labels)

    def set_progress(self, step: int, total_steps: int) -> None:
        """Called by ``fit`` before every training step, for schedules (default: nothing)."""

    def eval_encoder(self) -> nn.Module:
        """The module that maps images to the features to evaluate (default: ``encoder_q``, unwrapped)."""
        return unwrap(self.encoder_q)

    def compile_encoders(self) -> None:
        """``torch.compile`` the modules that encode images, in place (``Module.compile``: the state-dict keys
        stay those of the plain model). Default: ``encoder_q``."""
        self.encoder_q.compile()

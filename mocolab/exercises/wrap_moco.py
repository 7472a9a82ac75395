"""The learner's functions, training the course's models.

Once an exercise passes, the experiment that follows runs on the learner's function:

- :func:`your_moco` builds the MoCo of notebooks 04 to 06 with the learner's ``enqueue``,
  ``momentum_update`` and ``shuffled_keys`` inside its step (a :class:`MoCoFromPieces`), or plain
  :class:`mocolab.MoCo` when none of the functions given is the learner's (a stub not written yet:
  :func:`~mocolab.exercises.check` returned the library's stand-in), so that such a run is exactly the library's.
- :class:`MoCoFromStep` makes a whole ``moco_step`` (notebook 07) a model that :func:`mocolab.fit` trains.
- :func:`train_side_by_side` trains a ``moco_step`` and :class:`mocolab.MoCo` from the same weights, batches
  and views, and compares them.

Letters: N batch size, C feature dim, K queue size.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..device import seed_everything
from ..distributed import concat_all_gather, world_size
from ..interface import ContrastiveModel
from ..moco import MoCo
from ..train import TrainConfig, fit
from .use import is_yours

__all__ = ["your_moco", "MoCoFromPieces", "MoCoFromStep", "LogitsRecorder", "checked_against", "SideBySide",
           "train_side_by_side"]

PIECES = ("enqueue", "momentum_update", "shuffled_keys")


def your_moco(base_encoder: Callable[..., nn.Module], *args, enqueue: Callable | None = None,
              momentum_update: Callable | None = None, shuffled_keys: Callable | None = None, **kwargs) -> MoCo:
    """``MoCo(base_encoder, *args, **kwargs)`` whose step calls those of the functions given that are the learner's.

    A function that is the library's stand-in (:func:`~mocolab.exercises.is_yours` is False) or None is left
    out; when none is left, this is plain :class:`mocolab.MoCo`, built exactly as ``MoCo(...)`` builds it.

    Raises:
        ValueError: as :class:`MoCoFromPieces`.
    """
    given = {"enqueue": enqueue, "momentum_update": momentum_update, "shuffled_keys": shuffled_keys}
    pieces = {name: fn for name, fn in given.items() if fn is not None and is_yours(name, fn)}
    if not pieces:
        return MoCo(base_encoder, *args, **kwargs)
    return MoCoFromPieces(base_encoder, *args, **pieces, **kwargs)


class MoCoFromPieces(MoCo):
    """:class:`mocolab.MoCo` whose step calls the learner's functions where they are given.

    ``momentum_update(encoder_k, encoder_q, m)`` (notebook 05) replaces the fused update of the key encoder,
    ``shuffled_keys(encoder_k, im_k) -> k`` (notebook 06) computes the keys whenever MoCo shuffles them on one
    device (``shuffle_bn="split"`` with ``shuffle_keys=True``), and ``enqueue(queue, ptr, keys) -> new ptr``
    (notebook 04) writes the keys into ``queue`` and gives ``queue_ptr``. Everything else is MoCo's:
    the queries, the logits, the bookkeeping of the queue (where each key came from, and when).

    Args:
        base_encoder, *args, **kwargs: as :class:`mocolab.MoCo`.
        enqueue, momentum_update, shuffled_keys: the learner's functions, or None for MoCo's own.

    Raises:
        ValueError: ``momentum_buffers=True`` with the learner's ``momentum_update`` (it averages the parameters
            only), or the learner's ``enqueue`` or ``shuffled_keys`` under several processes (they see one
            process's batch); as :class:`mocolab.MoCo` otherwise.
    """

    def __init__(self, base_encoder: Callable[..., nn.Module], *args, enqueue: Callable | None = None,
                 momentum_update: Callable | None = None, shuffled_keys: Callable | None = None, **kwargs):
        super().__init__(base_encoder, *args, **kwargs)
        if momentum_update is not None and self.momentum_buffers:
            raise ValueError("momentum_buffers=True averages the BN statistics too; the learner's momentum_update "
                             "averages the parameters only: leave momentum_buffers False")
        if (enqueue is not None or shuffled_keys is not None) and world_size() > 1:
            raise ValueError("the learner's enqueue and shuffled_keys work on one process's batch; under several "
                             "processes use mocolab.MoCo")
        self.pieces = {name: fn for name, fn in zip(PIECES, (enqueue, momentum_update, shuffled_keys))
                       if fn is not None}

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """θk ← m·θk + (1 − m)·θq, by the learner's ``momentum_update`` if given."""
        if "momentum_update" not in self.pieces:
            return super()._momentum_update_key_encoder()
        self.pieces["momentum_update"](self.encoder_k, self.encoder_q, self.m)

    @torch.no_grad()
    def _keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """Keys (N, C), unit length: by the learner's ``shuffled_keys`` where MoCo shuffles within the batch."""
        if "shuffled_keys" not in self.pieces or self._shuffle_mode() != "split" or not self.shuffle_keys:
            return super()._keys(im_k)
        return self.pieces["shuffled_keys"](self.encoder_k, im_k)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """The keys (N, C) into the queue by the learner's ``enqueue`` if given; then MoCo's bookkeeping."""
        if "enqueue" not in self.pieces:
            return super()._dequeue_and_enqueue(keys, index)
        keys = concat_all_gather(keys)
        n = keys.shape[0]
        kept = min(n, self.K)
        slots = self._slots(n - kept, kept)  # (kept,): where the keys go, as KeyQueue.enqueue places them
        ptr = self.pieces["enqueue"](self.queue, int(self.queue_ptr), keys)  # the learner's enqueue takes an int
        self.queue_ptr.fill_(int(ptr))
        if index is not None:
            self.queue_index.index_copy_(0, slots, concat_all_gather(index)[n - kept:].to(self.queue_index))
        self.queue_step.index_copy_(0, slots, self.queue_count.expand(kept))
        filled = min(self.K, self._num_filled() + n)
        if filled != self._filled:
            self.queue_filled.fill_(filled)
            self._filled = filled
        self.queue_count += 1


class MoCoFromStep(ContrastiveModel):
    """A whole MoCo step written as one function, as a model that :func:`mocolab.fit` trains.

    ``forward`` calls ``moco_step(encoder_q, encoder_k, queue, ptr, im_q, im_k, m, T) -> (logits, labels, new ptr)``
    (notebook 07) with this model's encoders, queue (C, K) and pointer, and keeps the new pointer in ``queue_ptr``.
    The encoders, the queue, m and T are taken over from ``moco``, a freshly built :class:`mocolab.MoCo` (not
    copied): the step starts from MoCo's initial weights and queue, with its BN layers (``SplitBatchNorm`` groups
    under ``shuffle_bn="split"``). Whether the keys are shuffled is up to the step.

    Args:
        moco_step: the step function.
        moco: the MoCo whose parts the step trains (one process, constant m, not symmetric, a random initial queue).

    Raises:
        ValueError: a ``moco`` with a momentum schedule, the symmetric loss, an empty initial queue, averaged BN
            statistics, or several processes (the step sees only its own).
    """

    def __init__(self, moco_step: Callable, moco: MoCo):
        super().__init__()
        unsupported = {"momentum_schedule": moco.momentum_schedule != "constant", "symmetric": moco.symmetric,
                       "queue_init": moco.queue_init != "random", "momentum_buffers": moco.momentum_buffers}
        bad = [name for name, is_bad in unsupported.items() if is_bad]
        if bad:
            raise ValueError(f"a moco_step computes the plain MoCo step; build the MoCo without {', '.join(bad)}")
        if world_size() > 1:
            raise ValueError("a moco_step sees one process's batch and queue; under several processes use mocolab.MoCo")
        self.moco_step = moco_step
        self.encoder_q, self.encoder_k = moco.encoder_q, moco.encoder_k
        self.register_buffer("queue", moco.queue)  # (C, K)
        self.register_buffer("queue_ptr", moco.queue_ptr)
        self.K, self.m, self.T = moco.K, moco.m, moco.T

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, index: torch.Tensor | None = None):
        """One step of ``moco_step``: ``(logits (N, 1+K), labels (N,))``; the queue and ``queue_ptr`` move on."""
        ptr = int(self.queue_ptr)  # the step takes the pointer as an int
        logits, labels, ptr = self.moco_step(self.encoder_q, self.encoder_k, self.queue, ptr, im_q, im_k, self.m,
                                             self.T)
        self.queue_ptr.fill_(int(ptr))
        return logits, labels


class LogitsRecorder:
    """``fit(..., on_step=recorder)``: keeps the logits (N, 1+K) of every step, on the CPU."""

    def __init__(self):
        self.logits: list[torch.Tensor] = []

    def __call__(self, state) -> None:
        self.logits.append(state.logits.detach().float().cpu())


def checked_against(moco_step: Callable, reference: MoCo, differences: list) -> Callable:
    """``moco_step``, which first runs ``reference``'s step from the same state and notes how far the logits differ.

    Before each call, the reference takes the encoders, the queue and the pointer the step is given, and draws
    the same random numbers (the random state is restored after it); after the call, the largest
    |logit of the step − logit of the reference| is appended to ``differences``. The reference is changed by
    every call; the step's arguments and results are not.
    """

    def step(encoder_q, encoder_k, queue, ptr, im_q, im_k, m, T):
        reference.to(im_q.device)
        reference.encoder_q.load_state_dict(encoder_q.state_dict())
        reference.encoder_k.load_state_dict(encoder_k.state_dict())
        reference.queue.copy_(queue)
        reference.queue_ptr.fill_(int(ptr))
        reference.m, reference.T = m, T
        devices = [im_q.device.index or 0] if im_q.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            expected, _ = reference(im_q, im_k)
        logits, labels, new_ptr = moco_step(encoder_q, encoder_k, queue, ptr, im_q, im_k, m, T)
        differences.append(float((logits.detach().float() - expected.float()).abs().max()))
        return logits, labels, new_ptr

    return step


@dataclass
class SideBySide:
    """What :func:`train_side_by_side` measured: each model, its ``fit`` history and its logits of every step."""

    step_model: MoCoFromStep
    moco: MoCo
    step_history: dict
    moco_history: dict
    step_logits: list
    moco_logits: list
    step_differences: list  # per step: the largest |logit difference| of the two steps from the same state

    @property
    def max_logit_difference(self) -> float:
        """The largest |logit of the step's training − logit of MoCo's training| over every step, query and key."""
        return max(float((a - b).abs().max()) for a, b in zip(self.step_logits, self.moco_logits))

    @property
    def max_step_difference(self) -> float:
        """The largest |logit difference| of the step and MoCo's step, each time run from the same state."""
        return max(self.step_differences)

    @property
    def max_queue_difference(self) -> float:
        """The largest |difference| between the two queues after training."""
        return float((self.step_model.queue - self.moco.queue).abs().max())

    @property
    def same_pointer(self) -> bool:
        """Whether both queue pointers ended at the same slot."""
        return int(self.step_model.queue_ptr) == int(self.moco.queue_ptr)


def train_side_by_side(moco_step: Callable, build: Callable[[], MoCo], images: torch.Tensor, augment: nn.Module,
                       config: TrainConfig, *, seed: int, eval_data: tuple | None = None,
                       device: str | torch.device = "auto") -> SideBySide:
    """Train ``MoCoFromStep(moco_step, build())`` and ``build()`` with :func:`mocolab.fit`, one after the other.

    Before each model is built everything is seeded with ``seed``: both start from the same weights and queue
    and draw the same random numbers (the key shuffle's permutations); ``fit`` gives both the same batches and
    views (``config.seed``). At every step of the first training, MoCo's step also runs from the same state
    (:func:`checked_against`), so that rounding differences that training amplifies are told apart from
    differences of the step itself.

    Args:
        moco_step: the step function (notebook 07).
        build: makes a fresh :class:`mocolab.MoCo` (called three times: the two models and the reference).
        images, augment, config, eval_data, device: as :func:`mocolab.fit`.
        seed: seeds Python, NumPy and PyTorch before each model is built.
    """
    with torch.random.fork_rng(devices=[]):
        reference = build()
    differences: list[float] = []
    runs = []
    for wrap in (True, False):
        seed_everything(seed)
        model = MoCoFromStep(checked_against(moco_step, reference, differences), build()) if wrap else build()
        recorder = LogitsRecorder()
        history = fit(model, images, augment, config, eval_data=eval_data, device=device, on_step=recorder,
                      desc="your moco_step" if wrap else "mocolab.MoCo", verbose=False)
        runs.append((model, history, recorder.logits))
    (step_model, step_history, step_logits), (moco, moco_history, moco_logits) = runs
    step_model.moco_step = moco_step  # the model as the learner wrote it, without the comparison
    return SideBySide(step_model, moco, step_history, moco_history, step_logits, moco_logits, differences)

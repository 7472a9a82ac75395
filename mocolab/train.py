"""The training loop shared by the notebooks and ``mocolab pretrain`` (:mod:`mocolab.pretrain`).

``fit`` trains any :class:`~mocolab.interface.ContrastiveModel` (MoCo, its baselines and variants,
CMC, the distillers), calling only that interface, on a uint8 image tensor, with the augmentation
run batched on the training device (:class:`~mocolab.augment.BatchAugment`), SGD with cosine decay,
the weighted kNN monitor, a NaN guard, a progress bar and resumable checkpoints
(:mod:`mocolab.checkpoint`). It returns the history as plain lists. Under ``torchrun`` the same loop runs data-parallel
(:mod:`mocolab.distributed`).

Letters: N dataset size, B (global) batch size, W processes, b = B / W per-process batch.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from . import distributed
from .checkpoint import clean_state_dict, restore_training_state, rng_state, save_checkpoint, to_plain, training_state
from .device import get_device
from .evaluate import extract_features, knn_accuracy
from .interface import ContrastiveModel
from .progress import progress

__all__ = ["TrainConfig", "fit", "train_step", "NonFiniteLossError", "DivergenceError", "make_optimizer", "lr_at"]


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss, a parameter, a buffer or the optimizer state became NaN or infinite."""


DivergenceError = NonFiniteLossError  # the same error under a name that says what happened


SCHEDULES = ("cosine", "step", "constant")


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`fit`. Defaults: the MoCo CIFAR-10 demo's optimiser."""

    epochs: int = 10                # passes over the training images
    batch_size: int = 256           # B, images per step (the last partial batch is dropped)
    lr: float = 0.06                # SGD learning rate (demo: 0.06 for batch 512)
    momentum: float = 0.9           # SGD momentum (not MoCo's m)
    weight_decay: float = 5e-4      # SGD weight decay
    schedule: str = "cosine"        # "cosine" decay to 0 over all steps, "step" (x0.1 at 60% and 80%), "constant"
    knn_every: int = 1              # run the kNN monitor every this many epochs (0: only at the end)
    knn_k: int = 200                # neighbours of the kNN monitor
    knn_t: float = 0.1              # temperature of the kNN monitor's vote weights
    channels_last: bool = False     # channels_last memory format (faster convolutions on CPU and GPU)
    amp: bool | None = None         # bf16 autocast; None = on for CUDA, off elsewhere
    seed: int = 0                   # seeds the batch order and the augmentations
    compile: bool = False           # torch.compile the encoders (Module.compile: state-dict keys unchanged)
    save_every: int = 1             # with a checkpoint: write it every this many epochs (0: only at the end) ...
    save_every_seconds: float = 0.0  # ... or when this many seconds have passed since the last write (0: off)

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"SGD momentum must be in [0, 1), got {self.momentum}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63 - 2**32:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.knn_every < 0:
            raise ValueError(f"knn_every must be >= 0, got {self.knn_every}")
        if int(self.save_every) != self.save_every or self.save_every < 0 or not self.save_every_seconds >= 0:
            raise ValueError(f"save_every and save_every_seconds must be >= 0, got {self.save_every} and "
                             f"{self.save_every_seconds}")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from a dict; an unknown key is an error that lists the allowed ones."""
        allowed = {f.name for f in fields(cls)}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"unknown training parameter(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(config: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate at ``step``: cosine decay from ``lr`` to 0, steps (x0.1 at 60 % and 80 % of training,
    the official 120 and 160 of 200 epochs), or constant."""
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "step":
        frac = step / max(1, total_steps)
        return config.lr * (0.1 ** ((frac >= 0.6) + (frac >= 0.8)))
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total_steps)))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD over the parameters that require gradients (the key encoder is left out); the fused kernel when
    they are all on a GPU, the default (foreach) elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if params and all(p.is_cuda for p in params) else {}
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, **fused)


def _finite_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The floating-point parameters, buffers and optimizer states: what must stay finite."""
    ts = [t for t in model.parameters()] + [t for t in model.buffers()]
    ts += [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return [t for t in ts if t.is_floating_point() and t.numel()]


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor on the device: all ``tensors`` finite (one fused reduction, no host sync)."""
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.stack([m.float() for m in torch._foreach_norm(tensors, float("inf"))]).isfinite().all()


def _nonfinite_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Names of the parameters, buffers and optimizer states holding NaN or inf (reads them all: for errors)."""
    names = {id(p): n for n, p in model.named_parameters()}
    named = [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers())]
    named += [(f"{names.get(id(p), '?')} ({k})", v) for p, st in opt.state.items() for k, v in st.items()
              if isinstance(v, torch.Tensor)]
    bad = [n for n, t in named if t.is_floating_point() and not bool(t.isfinite().all())]
    return list(clean_state_dict(dict.fromkeys(bad)))


def train_step(model: ContrastiveModel, opt: torch.optim.Optimizer, im_q: torch.Tensor, im_k: torch.Tensor,
               index: torch.Tensor | None = None, *, lr: float | None = None, amp: bool = False):
    """One optimisation step of :func:`fit`: forward, loss, backward, SGD update, with no host sync.

    The update is made whatever the loss: :func:`fit` checks the loss, the parameters, the buffers and
    the optimizer state for NaN and inf at the end of every epoch (:class:`NonFiniteLossError`).

    Returns:
        ``(loss, logits, labels)``: this process's loss as a detached 0-dim tensor on the device
        (``float(loss)`` reads it: a host sync), logits detached.
    """
    if lr is not None:
        for g in opt.param_groups:
            g["lr"] = lr
    with torch.autocast(im_q.device.type, dtype=torch.bfloat16, enabled=amp):
        logits, labels = model(im_q, im_k, index=index)
        loss = model.loss(logits.float(), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), logits.detach(), labels


def fit(model: ContrastiveModel, images: torch.Tensor, augment: nn.Module, config: TrainConfig | None = None, *,
        eval_data: tuple | None = None, device: str | torch.device = "auto", on_step: Callable | None = None,
        on_epoch: Callable | None = None, desc: str = "train", verbose: bool = True,
        checkpoint: str | os.PathLike | None = None, resume: str | os.PathLike | dict | None = None,
        run_config: dict | None = None) -> dict:
    """Train ``model`` on ``images`` for ``config.epochs`` epochs and return the history.

    The one training loop of mocolab: the notebooks call it directly, ``mocolab pretrain``
    through :func:`mocolab.pretrain.pretrain`. The same code runs on a CPU, one GPU, or W processes under
    ``torchrun`` (each rank takes its slice of every global batch; see :mod:`mocolab.distributed`).

    A step reads nothing back to the host: the loss and the pretext accuracy are added up on the
    device and read once per epoch, when the loss, the parameters, the buffers and the optimizer
    state are also checked for NaN and inf (one fused reduction). With ``on_step`` the loss is read
    every step (the callback gets numbers).

    Args:
        model: a :class:`~mocolab.interface.ContrastiveModel`; ``fit`` calls its ``set_progress``, ``forward``,
            ``loss``, ``eval_encoder`` and (with ``config.compile``) ``compile_encoders``, nothing else.
        images: uint8 (N, 3, H, W) training images (moved to the device once).
        augment: maps a uint8 batch to a normalised float batch of views, e.g. ``BatchAugment``
            (called once per step on the batch twice over, 2b images: draws must be per image).
        config: :class:`TrainConfig`.
        eval_data: ``(bank_images, bank_labels, test_images, test_labels)`` for the kNN monitor, or None
            (kept on the device; the monitor runs there, under bf16 autocast with ``amp``).
        device: ``"auto"`` or a device.
        on_step: ``on_step(state)`` after every step; ``state`` has model, step, epoch, loss (a float),
            logits, labels, index, im_q, im_k (the views). For measurements inside a lesson.
        on_epoch: ``on_epoch(epoch, history)`` after every epoch, after the kNN monitor and before the
            checkpoint (what it appends to ``history`` is saved and restored on resume).
        checkpoint: write the full training state there (atomically, rank 0 only, see
            :mod:`mocolab.checkpoint`) every ``config.save_every`` epochs or ``config.save_every_seconds``,
            after the last epoch, and on KeyboardInterrupt or divergence (the last finished epoch, if
            not written yet, as it was at its end). A state that is not finite is never written.
        resume: a checkpoint path (or a loaded checkpoint) to continue from: model, optimizer,
            random-number generators, step and history are restored, so the run continues as if it
            had never stopped (bit-identically on the CPU; on a GPU up to its non-deterministic kernels).
        run_config: plain-value settings stored in the checkpoint under ``config`` (default: ``config``'s).

    Returns:
        dict of lists: ``epoch``, ``loss`` (epoch mean), ``pretext_acc`` (% of queries whose top logit is
        the positive), ``lr``, ``knn_epoch`` / ``knn_acc``, ``step_loss``; and ``images_per_second``,
        ``train_seconds``, ``device``.

    Raises:
        NonFiniteLossError: the loss, a parameter, a buffer or the optimizer state became NaN/inf (the
            message says which, at which epoch, and what to change); the last checkpoint stays finite.
        CheckpointError: ``resume`` is unreadable or does not fit this model / data / batch size.
        ValueError: bad configuration or images.
        TypeError: ``model`` is not a ContrastiveModel.
    """
    if not isinstance(model, ContrastiveModel):
        raise TypeError(f"fit trains a mocolab.ContrastiveModel (forward(im_q, im_k, index) -> (logits, labels), "
                        f"loss(logits, labels), ...); got {type(model).__name__}: subclass mocolab.ContrastiveModel")
    config = config or TrainConfig()
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be a uint8 tensor (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    W, r = distributed.world_size(), distributed.rank()
    main = r == 0
    n = images.shape[0]
    if n < config.batch_size:
        raise ValueError(f"batch_size {config.batch_size} is larger than the dataset ({n} images)")
    if config.batch_size % W:
        raise ValueError(f"batch_size {config.batch_size} (the global batch) must be divisible by the "
                         f"number of processes {W}")
    dev = get_device(device, verbose=verbose and main) if not isinstance(device, torch.device) else device
    model.to(dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks the fastest kernels once
    amp = config.amp if config.amp is not None else dev.type == "cuda"
    host_images, images = images, images.to(dev)
    index_all = torch.arange(n, device=dev)
    gen = torch.Generator().manual_seed(config.seed)  # batch order: the same on every rank
    aug_gen = torch.Generator(device=dev).manual_seed(config.seed + 1 + 7919 * r)  # views: one stream per rank
    opt = make_optimizer(model, config)
    steps_per_epoch = n // config.batch_size
    total = steps_per_epoch * config.epochs
    hist = {"epoch": [], "loss": [], "pretext_acc": [], "lr": [], "knn_epoch": [], "knn_acc": [], "step_loss": []}
    step, t_train, seen, start_epoch = 0, 0.0, 0, 1

    if resume is not None:  # model, optimizer and random-number generators as the checkpoint left them
        state = restore_training_state(resume, model, opt, steps_per_epoch, gen, aug_gen, dev, rank=r, world_size=W,
                                       verbose=verbose and main)
        step, start_epoch = int(state["step"]), int(state["epoch"]) + 1
        t_train, seen = float(state.get("train_seconds", 0.0)), int(state.get("images_seen", 0))
        hist = {**hist, **{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in state["history"].items()}}

    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    if config.compile:
        model.compile_encoders()
    distributed.broadcast_module(model)  # identical start on every rank
    distributed.wrap_trained_encoders(model, dev)

    monitor = None  # the kNN monitor's data, on the device (rank 0 evaluates alone)
    if eval_data is not None and main:
        bank_x, bank_y, test_x, test_y = eval_data
        bank_x = images if bank_x is host_images else bank_x.to(dev)  # often the training images themselves
        bank_y, test_x, test_y = bank_y.to(dev), test_x.to(dev), test_y.to(dev)
        monitor = (bank_x, bank_y, test_x, test_y, int(max(bank_y.max(), test_y.max())) + 1)

    def knn(epoch):
        if monitor is None:
            return
        bank_x, bank_y, test_x, test_y, num_classes = monitor
        enc = model.eval_encoder()
        kw = dict(batch_size=1024, amp=amp, channels_last=config.channels_last, to_cpu=False)
        acc = knn_accuracy(extract_features(enc, bank_x, **kw), bank_y, extract_features(enc, test_x, **kw),
                           test_y, k=config.knn_k, t=config.knn_t, num_classes=num_classes)  # one host sync
        hist["knn_epoch"].append(epoch)
        hist["knn_acc"].append(acc)

    def snapshot(epoch, clone: bool) -> dict | None:
        """The checkpoint of the state now (end of ``epoch``); ``clone``: copies, to be written later."""
        rng = distributed.all_gather_objects(rng_state(gen, aug_gen, dev))  # every rank takes part
        if not main:
            return None
        return training_state(model, opt, clone=clone, epoch=epoch, step=step, rng=rng, history=to_plain(hist),
                              train_seconds=t_train, images_seen=seen, world_size=W, device=str(dev),
                              train_config=config.to_dict(),
                              config=run_config if run_config is not None else config.to_dict())

    same_file = isinstance(resume, dict) or (resume is not None and checkpoint is not None
                                             and Path(resume).resolve() == Path(checkpoint).resolve())
    written = {"epoch": start_epoch - 1 if same_file else 0, "time": time.monotonic()}  # what the file holds
    pending = None  # the last finished epoch's checkpoint when not written yet (for an interrupt or a divergence)

    def write(payload):
        nonlocal pending
        if payload is not None:
            save_checkpoint(checkpoint, payload)
            written["epoch"] = payload["epoch"]
        written["time"], pending = time.monotonic(), None

    def diverged(epoch, what: str, lr: float) -> NonFiniteLossError:
        """The error to raise, after writing the last finite epoch if it was not written yet."""
        bad = _nonfinite_names(model, opt)
        if bad:
            what += (f"{' and' if what else ''} {len(bad)} parameter(s), buffer(s) or optimizer state(s) are no "
                     f"longer finite ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})")
        if pending is not None:
            write(pending)
        if checkpoint is not None and written["epoch"] > 0:
            last = (f"; the checkpoint of epoch {written['epoch']} at {checkpoint} is intact (a state that is not "
                    f"finite is never saved): continue from it with a lower learning rate (mocolab pretrain: "
                    f"the same command with --resume --lr {config.lr / 10:g})")
        else:
            last = "; start again with a lower learning rate"
        return NonFiniteLossError(f"training diverged at epoch {epoch} (step {step} of {total}): {what.strip()}. "
                                  f"Lower the learning rate (now {lr:.4g}, --lr) or raise the temperature "
                                  f"(--T){last}")

    bar = progress(total=total, initial=step, desc=desc, leave=False, disable=not main)
    b = config.batch_size // W
    step_losses = torch.zeros(steps_per_epoch, device=dev)  # this epoch's losses, read once at its end
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            model.train()
            perm = torch.randperm(n, generator=gen).to(dev)
            correct, count = torch.zeros((), dtype=torch.long, device=dev), 0
            t0 = time.perf_counter()
            for s in range(steps_per_epoch):
                idx = perm[s * config.batch_size + r * b:s * config.batch_size + (r + 1) * b]  # this rank's slice
                x = images[idx]
                views = augment(torch.cat([x, x]), generator=aug_gen)  # both views in one call (per-image draws)
                if config.channels_last:
                    views = views.contiguous(memory_format=torch.channels_last)
                im_q, im_k = views.chunk(2)
                lr = lr_at(config, step, total)
                model.set_progress(step, total)
                loss, logits, labels = train_step(model, opt, im_q, im_k, index_all[idx], lr=lr, amp=amp)
                step_losses[s] = loss
                correct += (logits.argmax(dim=1) == labels).sum()
                count += logits.shape[0]
                step += 1
                if on_step is not None:
                    lv = float(distributed.all_reduce_mean(loss))  # the callback wants numbers: a sync per step
                    if not math.isfinite(lv):
                        raise diverged(epoch, f"the loss became {lv} at step {step}", lr)
                    on_step(SimpleNamespace(model=model, step=step - 1, epoch=epoch, loss=lv, logits=logits,
                                            labels=labels, index=idx, im_q=im_q, im_k=im_k))
                bar.update(1)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t_train += time.perf_counter() - t0
            seen += steps_per_epoch * config.batch_size
            flags = torch.stack([correct.float(), (~_all_finite(_finite_tensors(model, opt))).float().to(dev)])
            stats = distributed.all_reduce_mean(torch.cat([step_losses, flags])).tolist()  # the epoch's host read
            losses, n_correct, not_finite = stats[:steps_per_epoch], stats[-2], stats[-1]
            if not_finite or not all(math.isfinite(v) for v in losses):
                first = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
                what = "" if first is None else \
                    f"the loss became {losses[first]} at step {step - steps_per_epoch + first + 1}"
                raise diverged(epoch, what, lr)
            hist["step_loss"].extend(losses)
            hist["epoch"].append(epoch)
            hist["loss"].append(sum(v * b for v in losses) / (steps_per_epoch * b))
            hist["pretext_acc"].append(100.0 * n_correct / max(1, count))
            hist["lr"].append(lr)
            if (config.knn_every and epoch % config.knn_every == 0) or epoch == config.epochs:
                if not hist["knn_epoch"] or hist["knn_epoch"][-1] != epoch:
                    knn(epoch)
            bar.set_postfix(loss=f"{hist['loss'][-1]:.3f}",
                            knn=f"{hist['knn_acc'][-1]:.1f}" if hist["knn_acc"] else "-")
            if on_epoch is not None:
                on_epoch(epoch, hist)
            if checkpoint is not None:  # after on_epoch, so that what it adds to the history is saved too
                since = time.monotonic() - written["time"]
                due = (epoch == config.epochs or (config.save_every and epoch % config.save_every == 0)
                       or (config.save_every_seconds and since >= config.save_every_seconds))
                if due:
                    write(snapshot(epoch, clone=False))
                else:
                    pending = snapshot(epoch, clone=True)
    except KeyboardInterrupt:
        if pending is not None:
            write(pending)  # the last finished epoch, as it was at its end
        raise
    finally:
        bar.close()
        distributed.unwrap_trained_encoders(model)
    hist["images_per_second"] = seen / max(t_train, 1e-9)
    hist["train_seconds"] = t_train
    hist["device"] = str(dev)
    return hist

"""The training loop shared by the notebooks and ``mocolab pretrain``.

``fit`` trains any model with the contrastive training interface
(``logits, labels = model(im_q, im_k, index=...)``, ``loss = model.criterion(logits, labels)``:
:class:`~mocolab.moco.MoCo`, :class:`~mocolab.moco.EndToEnd`, :class:`~mocolab.moco.MemoryBankModel`)
on a uint8 image tensor, with the augmentation run batched on the training device
(:class:`~mocolab.data.BatchAugment`), SGD with cosine decay, the weighted kNN monitor,
a NaN guard and a progress bar. It returns the history as plain lists.

Letters: N dataset size, B batch size.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from .device import get_device
from .evaluate import knn_accuracy, extract_features
from .progress import progress

__all__ = ["TrainConfig", "fit", "NonFiniteLossError", "make_optimizer", "lr_at"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped."""


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`fit`. Defaults: the MoCo CIFAR-10 demo's optimiser."""

    epochs: int = 10                # passes over the training images
    batch_size: int = 256           # B, images per step (the last partial batch is dropped)
    lr: float = 0.06                # SGD learning rate (demo: 0.06 for batch 512)
    momentum: float = 0.9           # SGD momentum (not MoCo's m)
    weight_decay: float = 5e-4      # SGD weight decay
    schedule: str = "cosine"        # "cosine" decay to 0 over all steps, or "constant"
    knn_every: int = 1              # run the kNN monitor every this many epochs (0: only at the end)
    knn_k: int = 200                # neighbours of the kNN monitor
    knn_t: float = 0.1              # temperature of the kNN monitor's vote weights
    channels_last: bool = False     # channels_last memory format (faster convolutions on CPU and GPU)
    amp: bool | None = None         # bf16 autocast; None = on for CUDA, off elsewhere
    seed: int = 0                   # seeds the batch order and the augmentations

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError("weight_decay must be >= 0 and SGD momentum in [0, 1)")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.knn_every < 0:
            raise ValueError(f"knn_every must be >= 0, got {self.knn_every}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a dict; an unknown key is an error that lists the allowed ones."""
        allowed = {f.name for f in fields(cls)}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"unknown training parameter(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(config: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate at ``step``: cosine decay from ``lr`` to 0, or constant."""
    if config.schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total_steps)))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD over the parameters that require gradients (the key encoder is left out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _eval_encoder(model: nn.Module) -> nn.Module:
    return getattr(model, "encoder_q", model)


def fit(model: nn.Module, images: torch.Tensor, augment: nn.Module, config: TrainConfig | None = None, *,
        eval_data: tuple | None = None, device: str | torch.device = "auto", on_step: Callable | None = None,
        on_epoch: Callable | None = None, desc: str = "train", verbose: bool = True) -> dict:
    """Train ``model`` on ``images`` for ``config.epochs`` epochs and return the history.

    Args:
        model: a model with the contrastive training interface (see the module docstring).
        images: uint8 (N, 3, H, W) training images (moved to the device once).
        augment: maps a uint8 batch to a normalised float batch of views, e.g. ``BatchAugment``.
        config: :class:`TrainConfig`.
        eval_data: ``(bank_images, bank_labels, test_images, test_labels)`` for the kNN monitor, or None.
        device: ``"auto"`` or a device.
        on_step: ``on_step(state)`` after every step; ``state`` has model, step, epoch, loss, logits,
            labels, index, im_q, im_k (the views). For measurements inside a lesson.
        on_epoch: ``on_epoch(epoch, history)`` after every epoch (after the kNN monitor).

    Returns:
        dict of lists: ``epoch``, ``loss`` (epoch mean), ``pretext_acc`` (% of queries whose top logit is
        the positive), ``lr``, ``knn_epoch`` / ``knn_acc``, ``step_loss``; and ``images_per_second``,
        ``train_seconds``, ``device``.

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the message names the epoch and step).
        ValueError: bad configuration or images.
    """
    config = config or TrainConfig()
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be a uint8 tensor (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    n = images.shape[0]
    if n < config.batch_size:
        raise ValueError(f"batch_size {config.batch_size} is larger than the dataset ({n} images)")
    dev = get_device(device, verbose=verbose) if not isinstance(device, torch.device) else device
    model.to(dev)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    amp = config.amp if config.amp is not None else dev.type == "cuda"
    images = images.to(dev)
    index_all = torch.arange(n, device=dev)
    gen = torch.Generator().manual_seed(config.seed)
    aug_gen = torch.Generator(device=dev).manual_seed(config.seed + 1)
    opt = make_optimizer(model, config)
    steps_per_epoch = n // config.batch_size
    total = steps_per_epoch * config.epochs
    hist = {"epoch": [], "loss": [], "pretext_acc": [], "lr": [], "knn_epoch": [], "knn_acc": [], "step_loss": []}

    def knn(epoch):
        if eval_data is None:
            return
        bank_x, bank_y, test_x, test_y = eval_data
        enc = _eval_encoder(model)
        acc = knn_accuracy(extract_features(enc, bank_x), bank_y, extract_features(enc, test_x), test_y,
                           k=config.knn_k, t=config.knn_t)
        hist["knn_epoch"].append(epoch)
        hist["knn_acc"].append(acc)

    step, t_train, seen = 0, 0.0, 0
    bar = progress(total=total, desc=desc, leave=False)
    for epoch in range(1, config.epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen).to(dev)
        loss_sum, correct, count = 0.0, 0, 0
        t0 = time.perf_counter()
        for s in range(steps_per_epoch):
            idx = perm[s * config.batch_size:(s + 1) * config.batch_size]
            x = images[idx]
            im_q, im_k = augment(x, generator=aug_gen), augment(x, generator=aug_gen)
            if config.channels_last:
                im_q = im_q.contiguous(memory_format=torch.channels_last)
                im_k = im_k.contiguous(memory_format=torch.channels_last)
            lr = lr_at(config, step, total)
            for g in opt.param_groups:
                g["lr"] = lr
            if hasattr(model, "set_progress"):
                model.set_progress(step, total)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                logits, labels = model(im_q, im_k, index=index_all[idx])
                loss = model.criterion(logits.float(), labels)
            if not torch.isfinite(loss):
                bar.close()
                raise NonFiniteLossError(f"the loss became {loss.item()} at epoch {epoch}, step {step}; "
                                         f"lower the learning rate (now {lr:.4g}) or raise the temperature")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lv = loss.item()
            loss_sum += lv * idx.shape[0]
            correct += int((logits.argmax(dim=1) == labels).sum())
            count += logits.shape[0]
            hist["step_loss"].append(lv)
            if on_step is not None:
                on_step(SimpleNamespace(model=model, step=step, epoch=epoch, loss=lv, logits=logits.detach(),
                                        labels=labels, index=idx, im_q=im_q, im_k=im_k))
            step += 1
            bar.update(1)
        t_train += time.perf_counter() - t0
        seen += steps_per_epoch * config.batch_size
        hist["epoch"].append(epoch)
        hist["loss"].append(loss_sum / (steps_per_epoch * config.batch_size))
        hist["pretext_acc"].append(100.0 * correct / max(1, count))
        hist["lr"].append(lr)
        if (config.knn_every and epoch % config.knn_every == 0) or epoch == config.epochs:
            if not hist["knn_epoch"] or hist["knn_epoch"][-1] != epoch:
                knn(epoch)
        bar.set_postfix(loss=f"{hist['loss'][-1]:.3f}", knn=f"{hist['knn_acc'][-1]:.1f}" if hist["knn_acc"] else "-")
        if on_epoch is not None:
            on_epoch(epoch, hist)
    bar.close()
    hist["images_per_second"] = seen / max(t_train, 1e-9)
    hist["train_seconds"] = t_train
    hist["device"] = str(dev)
    return hist

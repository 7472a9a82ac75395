"""The training loop shared by the notebooks and ``mocolab pretrain``, and the pre-training recipe.

``fit`` trains any model with the contrastive training interface
(``logits, labels = model(im_q, im_k, index=...)``, ``loss = model.criterion(logits, labels)``:
:class:`~mocolab.moco.MoCo`, :class:`~mocolab.moco.EndToEnd`, :class:`~mocolab.moco.MemoryBankModel`)
on a uint8 image tensor, with the augmentation run batched on the training device
(:class:`~mocolab.data.BatchAugment`), SGD with cosine decay, the weighted kNN monitor,
a NaN guard, a progress bar and resumable checkpoints (:mod:`mocolab.checkpoint`). It returns
the history as plain lists. Under ``torchrun`` the same loop runs data-parallel
(:mod:`mocolab.distributed`).

``pretrain`` is the recipe behind ``mocolab pretrain``: it resolves a configuration (a preset such
as the official CIFAR-10 demo's, a MoCo version, explicit options), loads the data, builds
:class:`~mocolab.moco.MoCo`, calls ``fit`` and writes ``metrics.json`` and ``checkpoint.pt``.

Letters: N dataset size, B (global) batch size, W processes, b = B / W per-process batch.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from . import distributed
from .checkpoint import (FORMAT, CheckpointError, clean_state_dict, load_checkpoint, lock_run_dir,
                         remove_orphan_temporaries, save_checkpoint)
from .device import get_device, seed_everything
from .evaluate import knn_accuracy, extract_features
from .progress import progress

__all__ = ["TrainConfig", "fit", "train_step", "NonFiniteLossError", "DivergenceError", "make_optimizer", "lr_at",
           "pretrain", "resolve_config", "build_model", "PRESETS", "VERSIONS", "PretrainResult"]


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


def _eval_encoder(model: nn.Module) -> nn.Module:
    enc = getattr(model, "encoder_q", model)
    return getattr(enc, "module", enc)  # not through DistributedDataParallel (rank 0 evaluates alone)


def _plain(obj):
    """``obj`` with numbers, strings, lists, dicts and tensors only (what ``weights_only=True`` loads back)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    return str(obj)


def _rng_state(gen: torch.Generator, aug_gen: torch.Generator, dev: torch.device) -> dict:
    """This process's random-number states, as uint8 tensors (loadable with ``weights_only=True``)."""
    state = {"torch": torch.get_rng_state(), "batch_order": gen.get_state(), "augment": aug_gen.get_state(),
             "augment_device": dev.type}
    if dev.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev)
    return state


def _set_rng_state(rng, r: int, W: int, gen: torch.Generator, aug_gen: torch.Generator, dev: torch.device,
                   verbose: bool) -> None:
    rng = [rng] if isinstance(rng, dict) else list(rng)
    if len(rng) != W and verbose:
        print(f"mocolab: the checkpoint was written by {len(rng)} process(es), this run has {W}; "
              f"training continues, but not bit-identically")
    mine = rng[r] if r < len(rng) else rng[0]
    torch.set_rng_state(mine["torch"])
    gen.set_state(mine["batch_order"])
    if mine.get("augment_device") == dev.type:
        aug_gen.set_state(mine["augment"])
    elif verbose:
        print(f"mocolab: the checkpoint's augmentation stream was on {mine.get('augment_device')}, this run is "
              f"on {dev.type}; it restarts from the seed")
    if dev.type == "cuda" and "cuda" in mine:
        torch.cuda.set_rng_state(mine["cuda"], dev)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, im_q: torch.Tensor, im_k: torch.Tensor,
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
        loss = model.criterion(logits.float(), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), logits.detach(), labels


def fit(model: nn.Module, images: torch.Tensor, augment: nn.Module, config: TrainConfig | None = None, *,
        eval_data: tuple | None = None, device: str | torch.device = "auto", on_step: Callable | None = None,
        on_epoch: Callable | None = None, desc: str = "train", verbose: bool = True,
        checkpoint: str | os.PathLike | None = None, resume: str | os.PathLike | dict | None = None,
        run_config: dict | None = None) -> dict:
    """Train ``model`` on ``images`` for ``config.epochs`` epochs and return the history.

    The one training loop of mocolab: the notebooks call it directly, ``mocolab pretrain``
    through :func:`pretrain`. The same code runs on a CPU, one GPU, or W processes under
    ``torchrun`` (each rank takes its slice of every global batch; see :mod:`mocolab.distributed`).

    A step reads nothing back to the host: the loss and the pretext accuracy are added up on the
    device and read once per epoch, when the loss, the parameters, the buffers and the optimizer
    state are also checked for NaN and inf (one fused reduction). With ``on_step`` the loss is read
    every step (the callback gets numbers).

    Args:
        model: a model with the contrastive training interface (see the module docstring).
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
    """
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

    if resume is not None:
        state = resume if isinstance(resume, dict) else load_checkpoint(resume)
        where = resume if not isinstance(resume, dict) else "the checkpoint"
        impl = {k: opt.param_groups[0].get(k) for k in ("fused", "foreach")} if opt.param_groups else {}
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{where} does not fit this model: {str(err).splitlines()[0]}") from None
        for g in opt.param_groups:
            g.update(impl)  # this device's SGD kernel, not the one of the run that wrote the checkpoint
        if state["step"] != state["epoch"] * steps_per_epoch:
            raise CheckpointError(f"{where} was written after {state['step']} steps in {state['epoch']} epochs, "
                                  f"but this run has {steps_per_epoch} steps per epoch: the dataset size or "
                                  f"the batch size differ")
        step, start_epoch = int(state["step"]), int(state["epoch"]) + 1
        t_train, seen = float(state.get("train_seconds", 0.0)), int(state.get("images_seen", 0))
        hist = {**hist, **{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in state["history"].items()}}
        _set_rng_state(state["rng"], r, W, gen, aug_gen, dev, verbose and main)

    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    if config.compile:
        for name in ("encoder_q", "encoder_k"):
            if hasattr(model, name):
                getattr(model, name).compile()
    distributed.broadcast_module(model)  # identical start on every rank
    distributed.wrap_encoder_q(model, dev)

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
        enc = _eval_encoder(model)
        kw = dict(batch_size=1024, amp=amp, channels_last=config.channels_last, to_cpu=False)
        acc = knn_accuracy(extract_features(enc, bank_x, **kw), bank_y, extract_features(enc, test_x, **kw),
                           test_y, k=config.knn_k, t=config.knn_t, num_classes=num_classes)  # one host sync
        hist["knn_epoch"].append(epoch)
        hist["knn_acc"].append(acc)

    def snapshot(epoch, clone: bool) -> dict | None:
        """The checkpoint of the state now (end of ``epoch``); ``clone``: copies, to be written later."""
        rng = distributed.all_gather_objects(_rng_state(gen, aug_gen, dev))  # every rank takes part
        if not main:
            return None
        model_state, opt_state = clean_state_dict(model.state_dict()), opt.state_dict()
        if clone:
            model_state = {k: v.detach().clone() for k, v in model_state.items()}
            opt_state = copy.deepcopy(opt_state)
        return {"format": FORMAT, "model": model_state, "optimizer": opt_state, "epoch": epoch, "step": step,
                "rng": rng, "history": _plain(hist), "train_seconds": t_train, "images_seen": seen,
                "world_size": W, "device": str(dev), "train_config": config.to_dict(),
                "config": run_config if run_config is not None else config.to_dict()}

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
                if hasattr(model, "set_progress"):
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
        distributed.unwrap_encoder_q(model)
    hist["images_per_second"] = seen / max(t_train, 1e-9)
    hist["train_seconds"] = t_train
    hist["device"] = str(dev)
    return hist


# ----------------------------------------------------------------------------------------------
# The pre-training recipe behind `mocolab pretrain`
# ----------------------------------------------------------------------------------------------

#: Named recipes. ``cifar10-colab`` is the official MoCo CIFAR-10 demo (facebookresearch/moco, colab
#: notebook); ``cpu-small`` is a ConvNet version of it that runs on a laptop CPU in minutes.
PRESETS: dict[str, dict] = {
    "cpu-small": dict(data="shapes", arch="convnet", dim=128, K=4096, m=0.99, T=0.1, mlp=False, augment="v2",
                      symmetric=False, shuffle_bn="split", bn_splits=8, epochs=20, batch_size=256, lr=0.06,
                      weight_decay=5e-4, schedule="cosine", knn_every=5),
    "cifar10-colab": dict(data="cifar10", arch="resnet18-cifar", dim=128, K=4096, m=0.99, T=0.1, mlp=False,
                          augment="v2", symmetric=False, shuffle_bn="split", bn_splits=8, epochs=200,
                          batch_size=512, lr=0.06, weight_decay=5e-4, schedule="cosine", knn_every=1),
}

#: What ``--version`` changes on top of a preset: MoCo v1 (He et al. 2020) and v2 (Chen et al. 2020:
#: MLP head, stronger augmentation, T 0.2, cosine learning rate).
VERSIONS: dict[str, dict] = {
    "v1": dict(mlp=False, augment="v1", T=0.07, schedule="step"),
    "v2": dict(mlp=True, augment="v2", T=0.2, schedule="cosine"),
}

#: Every setting of :func:`pretrain`, with its default (a preset overrides these, options override both).
DEFAULTS: dict = dict(
    preset="cpu-small",   # a key of PRESETS
    version=None,         # None (the preset as is), "v1" or "v2" (see VERSIONS)
    data="shapes",        # shapes | cifar10 | stl10 | cifar10-small | imagefolder:PATH
    data_root=None,       # download directory of cifar10/stl10 (default $MOCOLAB_DATA or <repo>/data)
    download=False,       # download cifar10/stl10 if missing
    limit=None,           # use a class-balanced subset of this many training images (and limit/5 test images)
    image_size=None,      # side of the training views (default: the images' own size)
    arch="convnet",       # convnet | resnet18-cifar | resnet18 | resnet50
    dim=128,              # C, feature dimension
    K=4096,               # queue size; unless given explicitly, lowered to follow the data (see choose_queue_size)
    m=0.99,               # momentum of the key encoder
    T=0.1,                # softmax temperature
    mlp=False,            # MoCo v2 MLP projection head
    augment="v2",         # BatchAugment preset: v1 | v2
    symmetric=False,      # symmetric loss (both views as query and key)
    shuffle_bn="split",   # auto | off | split | ddp ("split" becomes "ddp" under torchrun)
    bn_splits=8,          # groups of SplitBatchNorm for shuffle_bn="split"
    epochs=20, batch_size=256, lr=0.06, momentum=0.9, weight_decay=5e-4, schedule="cosine",
    knn_every=5, knn_k=200, knn_t=0.1,
    seed=0,               # seeds the model, the batch order and the augmentations
    device="auto",        # auto | cpu | cuda | cuda:N | mps
    channels_last=False,  # channels_last memory format
    amp=None,             # bf16 autocast (None: on for CUDA)
    compile=False,        # torch.compile the encoders
    save_every=10,        # write out/checkpoint.pt every this many epochs (0: only at the end) ...
    save_every_seconds=600,  # ... or after this many seconds since the last write; always at the end and on Ctrl-C
    out=None,             # run directory: metrics.json and checkpoint.pt (None: write nothing)
    resume=False,         # continue from out/checkpoint.pt
    overwrite=False,      # start afresh even if out/checkpoint.pt exists
)

_TRAIN_KEYS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "knn_every", "knn_k", "knn_t",
               "channels_last", "amp", "seed", "compile", "save_every", "save_every_seconds")
# settings that may differ between a run and its resumption (more epochs: the lr schedule is stretched)
_RUNTIME_KEYS = {"device", "out", "resume", "overwrite", "download", "data_root", "compile", "knn_every", "amp",
                 "channels_last", "epochs", "save_every", "save_every_seconds"}
# settings that a resumption may change, and says it did (e.g. a lower lr after a divergence)
_RESUME_CHANGEABLE = {"lr", "T", "weight_decay"}
# what a run writes into its directory: any of them there means a previous run
_RUN_FILES = ("checkpoint.pt", "metrics.json")


def _check_data_name(name) -> None:
    from .data import DATASET_NAMES

    if not isinstance(name, str) or not name:
        raise ValueError(f"data must be a dataset name, got {name!r}")
    if name.lower() in DATASET_NAMES or os.path.isdir(os.path.expanduser(name)):
        return
    if name.lower().startswith("imagefolder:"):
        folder = name.split(":", 1)[1]
        if not os.path.isdir(os.path.expanduser(folder)):
            raise ValueError(f"data {name!r}: the ImageFolder directory {folder} does not exist")
        return
    if os.sep in name or (os.altsep and os.altsep in name) or name.startswith(("~", ".")):
        exists = os.path.exists(os.path.expanduser(name))
        kind = "is a file, not an ImageFolder directory" if exists else "does not exist"
        raise ValueError(f"data path {name} {kind} (give an ImageFolder directory <path>/<class>/<image>, or one of "
                         f"{', '.join(DATASET_NAMES)})")
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)} or imagefolder:PATH")


def resolve_config(preset: str | None = "cpu-small", version: str | None = None, **options) -> dict:
    """The full settings of a pre-training run: :data:`DEFAULTS` < ``PRESETS[preset]`` < ``VERSIONS[version]`` < options.

    Options set to None are ignored (they leave the preset's value). Everything is checked here,
    before any data is loaded.

    Returns:
        a dict of plain values with every key of :data:`DEFAULTS`.

    Raises:
        ValueError: an unknown preset, version, architecture, dataset or option, or a value out of
            range (the message says what is allowed).
    """
    from .encoders import ENCODERS
    from .moco import SHUFFLE_BN_MODES

    preset = preset or "cpu-small"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if version is not None and version not in VERSIONS:
        raise ValueError(f"unknown MoCo version {version!r}; choose one of {', '.join(VERSIONS)}")
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; allowed: {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **PRESETS[preset], **(VERSIONS[version] if version else {}),
           **{k: v for k, v in options.items() if v is not None}, "preset": preset, "version": version}
    if cfg["arch"] not in ENCODERS:
        raise ValueError(f"unknown arch {cfg['arch']!r}; choose one of {', '.join(ENCODERS)}")
    _check_data_name(cfg["data"])
    if cfg["augment"] not in ("v1", "v2"):
        raise ValueError(f"augment must be 'v1' or 'v2', got {cfg['augment']!r}")
    if cfg["shuffle_bn"] not in SHUFFLE_BN_MODES:
        raise ValueError(f"shuffle_bn must be one of {', '.join(SHUFFLE_BN_MODES)}, got {cfg['shuffle_bn']!r}")
    for key in ("dim", "K", "bn_splits"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"{key} must be a positive integer, got {cfg[key]!r}")
    if not 0.0 <= float(cfg["m"]) <= 1.0:
        raise ValueError(f"m (key-encoder momentum) must be in [0, 1], got {cfg['m']}")
    if not (float(cfg["T"]) > 0 and math.isfinite(float(cfg["T"]))):
        raise ValueError(f"T (temperature) must be > 0 and finite, got {cfg['T']}")
    if cfg["limit"] is not None and (not isinstance(cfg["limit"], int) or cfg["limit"] < 1):
        raise ValueError(f"limit must be a positive integer, got {cfg['limit']!r}")
    if cfg["image_size"] is not None and (not isinstance(cfg["image_size"], int) or cfg["image_size"] < 8):
        raise ValueError(f"image_size must be an integer >= 8, got {cfg['image_size']!r}")
    if cfg["shuffle_bn"] == "split" and cfg["batch_size"] % cfg["bn_splits"]:
        raise ValueError(f"batch_size {cfg['batch_size']} must be divisible by bn_splits {cfg['bn_splits']} "
                         f"with shuffle_bn='split'")
    if cfg["resume"] and not cfg["out"]:
        raise ValueError("resume needs out (--out DIR: the run directory that holds checkpoint.pt)")
    get_device(cfg["device"], verbose=False)  # an unknown or absent device fails here
    TrainConfig(**{k: cfg[k] for k in _TRAIN_KEYS})  # checks epochs, batch_size, lr, ...
    if cfg["batch_size"] > cfg["K"] * (1 if not cfg["symmetric"] else 0.5):
        raise ValueError(f"K ({cfg['K']}) must hold at least one batch of keys ({cfg['batch_size']}"
                         f"{', twice with symmetric' if cfg['symmetric'] else ''})")
    return cfg


def choose_queue_size(K: int, num_images: int, batch_size: int, *, symmetric: bool = False,
                      explicit: bool = False) -> tuple[int, str | None]:
    """The queue size of a run on ``num_images`` images, and why, if it is not ``K`` as given.

    A queue holds the keys of the last K / B steps. Once it holds as many keys as an epoch enqueues
    (N, or 2N when symmetric), each image meets its own earlier key among the negatives, and
    the run pushes apart the two views it is meant to pull together. On 3,000 CIFAR-10 photos the
    preset's K 4096 reached 36.9 % kNN after 30 epochs and K 1024 47.4 % (see the README). So:

    * an explicit ``K`` at or above the keys per epoch is an error that names a K that fits;
    * a preset's ``K`` is lowered to the largest power of two at most half the keys per epoch (and at
      least one batch of keys); the reason is returned, to be printed.

    Returns:
        ``(K, reason)``; ``reason`` is None when K stays as given.

    Raises:
        ValueError: an explicit K too large for the data, or data too small for one batch of keys
            below the keys per epoch.
    """
    per_epoch = num_images * (2 if symmetric else 1)
    keys_per_step = batch_size * (2 if symmetric else 1)
    fit = 1 << max(0, int(per_epoch // 2).bit_length() - 1)  # largest power of two <= per_epoch / 2
    fit = max(fit, keys_per_step)
    if fit >= per_epoch:
        raise ValueError(f"{num_images} training images are too few for batch_size {batch_size}: the queue must hold "
                         f"at least one batch of keys ({keys_per_step}) and fewer keys than an epoch enqueues "
                         f"({per_epoch}); lower --batch-size to {max(1, num_images // 4)} or less")
    if K >= per_epoch:
        if explicit:
            raise ValueError(f"K {K} is not below the {per_epoch} keys an epoch enqueues ({num_images} images"
                             f"{', both views' if symmetric else ''}): the queue would hold each image's own "
                             f"earlier key as a negative; choose --K below {per_epoch}, e.g. {fit}")
    elif explicit or K <= fit:
        return K, None
    return fit, (f"queue size K {fit} instead of the preset's {K}: {num_images} training images enqueue "
                 f"{per_epoch} keys an epoch, and a queue that holds more than half of them pays in stale "
                 f"and repeated negatives (pass --K to choose)")


def build_model(cfg: dict) -> nn.Module:
    """The :class:`~mocolab.moco.MoCo` model of a resolved configuration (shuffle-BN ``split`` becomes ``ddp``
    under several processes)."""
    from .encoders import build_encoder
    from .moco import MoCo

    shuffle = cfg["shuffle_bn"]
    if distributed.world_size() > 1 and shuffle == "split":
        shuffle = "ddp"
    return MoCo(partial(build_encoder, cfg["arch"]), dim=cfg["dim"], K=cfg["K"], m=cfg["m"], T=cfg["T"],
                mlp=cfg["mlp"], shuffle_bn=shuffle, bn_splits=cfg["bn_splits"], symmetric=cfg["symmetric"])


def load_pretrain_data(cfg: dict, verbose: bool = True):
    """Training images and the kNN monitor's data of a resolved configuration.

    The monitor uses the labelled training split as the bank and the test split as queries (for
    STL-10: training on ``train+unlabeled``, bank ``train``, queries ``test``).

    Returns:
        ``(train_images, eval_data)``; eval_data is None when the dataset has no labelled test split.
    """
    from .data import load_images

    name, limit = cfg["data"], cfg["limit"]
    kw = dict(root=cfg["data_root"], download=cfg["download"], seed=cfg["seed"], image_size=cfg["image_size"])
    stl = name.lower() == "stl10"
    try:
        x, y, _ = load_images(name, "train+unlabeled" if stl else "train", limit=limit, **kw)
    except ValueError as err:
        if "different sizes" in str(err):
            raise ValueError(f"{err} (on the command line: --image-size)") from None
        raise
    test_limit = None if limit is None else max(10, limit // 5)
    try:
        bank_x, bank_y = (load_images(name, "train", limit=limit, **kw)[:2]) if stl else (x, y)
        test_x, test_y, _ = load_images(name, "test", limit=test_limit, **kw)
    except FileNotFoundError as err:
        if verbose:
            print(f"mocolab: no kNN monitor ({err})")
        return x, None
    if bool((bank_y < 0).all()):
        return x, None
    return x, (bank_x, bank_y, test_x, test_y)


@dataclass
class PretrainResult:
    """What :func:`pretrain` returns."""

    metrics: dict        # what metrics.json holds
    history: dict        # fit's history
    model: nn.Module     # the trained MoCo model (on its device)
    config: dict         # the resolved settings


def pretrain(config: dict | None = None, *, on_epoch: Callable | None = None, verbose: bool = True,
             **options) -> PretrainResult:
    """Pre-train MoCo as ``mocolab pretrain`` does: resolve the settings, load the data, build, train, report.

    Under ``torchrun`` each process calls this; it joins the process group from the environment
    (see :mod:`mocolab.distributed`), and rank 0 alone writes ``metrics.json`` and ``checkpoint.pt``.

    Args:
        config: settings (keys of :data:`DEFAULTS`, including ``preset`` and ``version``).
        on_epoch: passed to :func:`fit`.
        verbose: print the device and a line per epoch.
        **options: more settings, overriding ``config``.

    The run directory ``out`` is locked for the run's life (a second writer is refused) and checked
    to be writable before any data loads; temporary files of killed saves are removed; ``overwrite``
    removes the old run's ``checkpoint.pt`` and ``metrics.json`` first. ``metrics.json`` is rewritten after
    every epoch (``finished`` False) and at the end. A resumption may change
    ``lr``, ``T`` and ``weight_decay`` (it says so), and the settings of :data:`_RUNTIME_KEYS`; ``epochs``
    is the total and may not be below the epochs already trained.

    Returns:
        :class:`PretrainResult`. ``metrics`` has ``knn_acc`` (final, %), ``knn_history`` ([epoch, acc] pairs),
        ``loss_history``, ``pretext_acc_history``, ``images_per_second``, ``train_seconds``, ``epochs``,
        ``finished``, ``config``, ``device``, ``world_size``, ``num_images``; and, when there are any,
        ``warnings`` (e.g. a one-class kNN monitor) and ``resume_changes`` (``{name: [was, now]}``).

    Raises:
        ValueError: bad settings; FileNotFoundError: missing data; CheckpointError: a bad checkpoint, an
        existing run in ``out`` without ``resume``/``overwrite``, one from different settings, or ``epochs``
        below what it has trained; RunDirectoryError (a CheckpointError): ``out`` cannot be written or
        another process is writing it; NonFiniteLossError.
    """
    settings = {**(config or {}), **options}
    cfg = resolve_config(**settings)
    created, ddp_device = distributed.init_from_env(cfg["device"])
    try:
        main = distributed.is_main_process()
        out = Path(cfg["out"]) if cfg["out"] else None
        # one writer per run directory; taking the lock also checks that --out can be written, before any data loads
        with lock_run_dir(out) if out is not None and main else contextlib.nullcontext():
            return _pretrain_locked(cfg, out, main, ddp_device, on_epoch, verbose,
                                    explicit_K=settings.get("K") is not None)
    finally:
        if created:
            distributed.cleanup()


def _say(text: str, *, error: bool = False) -> None:
    import sys

    print(f"mocolab: {text}", file=sys.stderr if error else sys.stdout, flush=True)


def _check_resume(cfg: dict, state: dict, ckpt: Path, main: bool) -> dict:
    """Check that ``state`` may continue with ``cfg``; apply and announce the settings that may change.

    Returns ``{name: [was, now]}`` for the settings that changed (lr, T, weight_decay).
    """
    saved = state.get("config") or {}
    diff = sorted(k for k in DEFAULTS if k not in _RUNTIME_KEYS and k not in _RESUME_CHANGEABLE
                  and k in saved and saved[k] != cfg[k])
    if diff:
        raise CheckpointError(f"{ckpt} was written with other settings: "
                              + ", ".join(f"{k}={saved[k]!r} (now {cfg[k]!r})" for k in diff)
                              + "; resume with the same command (only "
                              + ", ".join(sorted(_RESUME_CHANGEABLE | _RUNTIME_KEYS - {"out", "resume", "overwrite"}))
                              + " may change), or start a new --out")
    done = int(state["epoch"])
    if cfg["epochs"] < done:
        raise CheckpointError(f"{ckpt} has already trained {done} epochs, more than epochs={cfg['epochs']} (--epochs "
                              f"{cfg['epochs']}); --epochs is the total: pass --epochs {done} or more to resume")
    changed = {k: [saved[k], cfg[k]] for k in sorted(_RESUME_CHANGEABLE) if k in saved and saved[k] != cfg[k]}
    if "weight_decay" in changed:  # the optimizer's state carries its own weight decay: give it the new one
        for group in state["optimizer"].get("param_groups", []):
            group["weight_decay"] = cfg["weight_decay"]
    if main:
        if changed:
            _say("resuming with " + ", ".join(f"{k} {now} (was {was})" for k, (was, now) in changed.items()))
        if cfg["epochs"] == done:
            _say(f"{ckpt} has already trained all {done} epochs: nothing to train (pass --epochs above {done} "
                 f"to train more)")
    return changed


def _pretrain_metrics(cfg: dict, hist: dict, num_images: int, notes: dict, finished: bool) -> dict:
    metrics = {
        "knn_acc": hist["knn_acc"][-1] if hist["knn_acc"] else None,
        "knn_history": [[e, a] for e, a in zip(hist["knn_epoch"], hist["knn_acc"])],
        "loss_history": hist["loss"],
        "pretext_acc_history": hist["pretext_acc"],
        "images_per_second": hist.get("images_per_second"),
        "train_seconds": hist.get("train_seconds"),
        "epochs": len(hist["epoch"]),
        "finished": finished,  # False while the run goes on (metrics.json is rewritten after every epoch)
        "config": cfg,
        "device": hist.get("device"),
        "world_size": distributed.world_size(),
        "num_images": num_images,
    }
    metrics.update({k: v for k, v in notes.items() if v})
    return metrics


def _write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_plain))
    os.replace(tmp, path)


def _pretrain_locked(cfg: dict, out: Path | None, main: bool, ddp_device, on_epoch, verbose: bool, *,
                     explicit_K: bool = False) -> PretrainResult:
    """The body of :func:`pretrain`, run while this process holds the run directory."""
    dev = ddp_device or get_device(cfg["device"], verbose=verbose and main)
    seed_everything(cfg["seed"])
    ckpt = out / "checkpoint.pt" if out is not None else None
    state, notes = None, {"warnings": [], "resume_changes": {}}
    if out is not None and main:
        removed = remove_orphan_temporaries(out)  # left by killed saves; no other writer runs (we hold the lock)
        if removed and verbose:
            _say(f"removed {len(removed)} temporary file(s) left in {out} by interrupted saves")
    if cfg["resume"]:
        state = load_checkpoint(ckpt)
        saved_K = (state.get("config") or {}).get("K")
        if not explicit_K and isinstance(saved_K, int):
            cfg["K"] = saved_K  # the queue size the run chose from its data
        notes["resume_changes"] = _check_resume(cfg, state, ckpt, main)
    elif out is not None:
        existing = [name for name in _RUN_FILES if (out / name).exists()]
        if existing and not cfg["overwrite"]:
            raise CheckpointError(f"{out / existing[0]} already exists (a previous run in {out}): pass resume=True "
                                  f"(--resume) to continue that run, overwrite=True (--overwrite) to start afresh, "
                                  f"or choose another out directory")
        if main:  # --overwrite: nothing of the old run may stand beside the new run's files
            for name in _RUN_FILES:
                (out / name).unlink(missing_ok=True)
    images, eval_data = load_pretrain_data(cfg, verbose=verbose and main)
    if eval_data is not None:
        labels = torch.cat([eval_data[1], eval_data[3]])
        num_classes = int(torch.unique(labels[labels >= 0]).numel())
        if num_classes < 2:
            text = (f"the data has {num_classes} class: the kNN monitor always predicts it, so its accuracy "
                    f"(100 %) says nothing about the features")
            notes["warnings"].append(text)
            if main:
                _say(f"warning: {text}", error=True)
    cfg["K"], why = choose_queue_size(cfg["K"], int(images.shape[0]), cfg["batch_size"],
                                      symmetric=cfg["symmetric"], explicit=explicit_K)
    if why is not None:
        notes["queue_size"] = why
        if main and verbose:
            _say(why)
    model = build_model(cfg)
    from .data import BatchAugment

    augment = BatchAugment(image_size=cfg["image_size"] or images.shape[-1], preset=cfg["augment"]).to(dev)
    tc = TrainConfig(**{k: cfg[k] for k in _TRAIN_KEYS})
    num_images = int(images.shape[0])

    def report(epoch, hist):
        if verbose and main:
            from tqdm.auto import tqdm

            knn = f", kNN {hist['knn_acc'][-1]:.1f} %" if hist["knn_epoch"] and hist["knn_epoch"][-1] == epoch else ""
            tqdm.write(f"epoch {epoch}/{tc.epochs}: loss {hist['loss'][-1]:.3f}, "
                       f"pretext acc {hist['pretext_acc'][-1]:.1f} %{knn}")
        if on_epoch is not None:
            on_epoch(epoch, hist)
        if out is not None and main:  # metrics.json follows the run, epoch by epoch
            _write_json(out / "metrics.json", _pretrain_metrics(cfg, hist, num_images, notes, finished=False))

    hist = fit(model, images, augment, tc, eval_data=eval_data, device=dev, on_epoch=report,
               desc=f"MoCo {cfg['arch']}", verbose=False, checkpoint=ckpt, resume=state, run_config=cfg)
    metrics = _pretrain_metrics(cfg, hist, num_images, notes, finished=True)
    if out is not None and main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "metrics.json", metrics)
    distributed.barrier()
    return PretrainResult(metrics=metrics, history=hist, model=model, config=cfg)

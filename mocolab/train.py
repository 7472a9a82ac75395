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
from .checkpoint import FORMAT, CheckpointError, clean_state_dict, load_checkpoint, save_checkpoint
from .device import get_device, seed_everything
from .evaluate import knn_accuracy, extract_features
from .progress import progress

__all__ = ["TrainConfig", "fit", "train_step", "NonFiniteLossError", "make_optimizer", "lr_at", "pretrain", "resolve_config",
           "build_model", "PRESETS", "VERSIONS", "PretrainResult"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped."""


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

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError("weight_decay must be >= 0 and SGD momentum in [0, 1)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
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
    """Learning rate at ``step``: cosine decay from ``lr`` to 0, steps (x0.1 at 60 % and 80 % of training,
    the official 120 and 160 of 200 epochs), or constant."""
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "step":
        frac = step / max(1, total_steps)
        return config.lr * (0.1 ** ((frac >= 0.6) + (frac >= 0.8)))
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total_steps)))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD over the parameters that require gradients (the key encoder is left out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


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
    """One optimisation step of :func:`fit`: forward, loss, backward, SGD update.

    The loss is averaged over processes (one scalar all-reduce under ``torchrun``) and read
    once; if it is not finite the update is skipped, so the caller can stop cleanly.

    Returns:
        ``(loss_value, logits, labels)``, logits detached.
    """
    if lr is not None:
        for g in opt.param_groups:
            g["lr"] = lr
    with torch.autocast(im_q.device.type, dtype=torch.bfloat16, enabled=amp):
        logits, labels = model(im_q, im_k, index=index)
        loss = model.criterion(logits.float(), labels)
    lv = float(distributed.all_reduce_mean(loss.detach()))  # one sync; the same value on every rank
    if math.isfinite(lv):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return lv, logits.detach(), labels


def fit(model: nn.Module, images: torch.Tensor, augment: nn.Module, config: TrainConfig | None = None, *,
        eval_data: tuple | None = None, device: str | torch.device = "auto", on_step: Callable | None = None,
        on_epoch: Callable | None = None, desc: str = "train", verbose: bool = True,
        checkpoint: str | os.PathLike | None = None, resume: str | os.PathLike | dict | None = None,
        run_config: dict | None = None) -> dict:
    """Train ``model`` on ``images`` for ``config.epochs`` epochs and return the history.

    The one training loop of mocolab: the notebooks call it directly, ``mocolab pretrain``
    through :func:`pretrain`. The same code runs on a CPU, one GPU, or W processes under
    ``torchrun`` (each rank takes its slice of every global batch; see :mod:`mocolab.distributed`).

    Args:
        model: a model with the contrastive training interface (see the module docstring).
        images: uint8 (N, 3, H, W) training images (moved to the device once).
        augment: maps a uint8 batch to a normalised float batch of views, e.g. ``BatchAugment``.
        config: :class:`TrainConfig`.
        eval_data: ``(bank_images, bank_labels, test_images, test_labels)`` for the kNN monitor, or None.
        device: ``"auto"`` or a device.
        on_step: ``on_step(state)`` after every step; ``state`` has model, step, epoch, loss, logits,
            labels, index, im_q, im_k (the views). For measurements inside a lesson.
        on_epoch: ``on_epoch(epoch, history)`` after every epoch, after the kNN monitor and before the
            checkpoint (what it appends to ``history`` is saved and restored on resume).
        checkpoint: write the full training state there after every epoch (atomically, rank 0 only),
            see :mod:`mocolab.checkpoint`.
        resume: a checkpoint path (or a loaded checkpoint) to continue from: model, optimizer,
            random-number generators, step and history are restored, so the run continues exactly
            as if it had never stopped.
        run_config: plain-value settings stored in the checkpoint under ``config`` (default: ``config``'s).

    Returns:
        dict of lists: ``epoch``, ``loss`` (epoch mean), ``pretext_acc`` (% of queries whose top logit is
        the positive), ``lr``, ``knn_epoch`` / ``knn_acc``, ``step_loss``; and ``images_per_second``,
        ``train_seconds``, ``device``.

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the message names the epoch and step); the
            checkpoint of the last finished epoch is left as it was.
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
    amp = config.amp if config.amp is not None else dev.type == "cuda"
    images = images.to(dev)
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
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{where} does not fit this model: {str(err).splitlines()[0]}") from None
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

    def knn(epoch):
        if eval_data is None or not main:
            return
        bank_x, bank_y, test_x, test_y = eval_data
        enc = _eval_encoder(model)
        acc = knn_accuracy(extract_features(enc, bank_x), bank_y, extract_features(enc, test_x), test_y,
                           k=config.knn_k, t=config.knn_t)
        hist["knn_epoch"].append(epoch)
        hist["knn_acc"].append(acc)

    def save(epoch):
        if checkpoint is None:
            return
        rng = distributed.all_gather_objects(_rng_state(gen, aug_gen, dev))  # every rank takes part
        if not main:
            return
        save_checkpoint(checkpoint, {
            "format": FORMAT, "model": clean_state_dict(model.state_dict()), "optimizer": opt.state_dict(),
            "epoch": epoch, "step": step, "rng": rng, "history": _plain(hist), "train_seconds": t_train,
            "images_seen": seen, "world_size": W, "device": str(dev), "train_config": config.to_dict(),
            "config": run_config if run_config is not None else config.to_dict()})

    bar = progress(total=total, initial=step, desc=desc, leave=False, disable=not main)
    b = config.batch_size // W
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            model.train()
            perm = torch.randperm(n, generator=gen).to(dev)
            loss_sum, correct, count = 0.0, torch.zeros((), dtype=torch.long, device=dev), 0
            t0 = time.perf_counter()
            for s in range(steps_per_epoch):
                idx = perm[s * config.batch_size + r * b:s * config.batch_size + (r + 1) * b]  # this rank's slice
                x = images[idx]
                im_q, im_k = augment(x, generator=aug_gen), augment(x, generator=aug_gen)
                if config.channels_last:
                    im_q = im_q.contiguous(memory_format=torch.channels_last)
                    im_k = im_k.contiguous(memory_format=torch.channels_last)
                lr = lr_at(config, step, total)
                if hasattr(model, "set_progress"):
                    model.set_progress(step, total)
                lv, logits, labels = train_step(model, opt, im_q, im_k, index_all[idx], lr=lr, amp=amp)
                if not math.isfinite(lv):
                    last = f"; the checkpoint of epoch {epoch - 1} at {checkpoint} is intact" \
                        if checkpoint is not None and epoch > 1 else ""
                    raise NonFiniteLossError(f"the loss became {lv} at epoch {epoch}, step {step}; lower the "
                                             f"learning rate (now {lr:.4g}) or raise the temperature{last}")
                loss_sum += lv * b
                correct += (logits.argmax(dim=1) == labels).sum()
                count += logits.shape[0]
                hist["step_loss"].append(lv)
                if on_step is not None:
                    on_step(SimpleNamespace(model=model, step=step, epoch=epoch, loss=lv, logits=logits,
                                            labels=labels, index=idx, im_q=im_q, im_k=im_k))
                step += 1
                bar.update(1)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t_train += time.perf_counter() - t0
            seen += steps_per_epoch * config.batch_size
            stats = distributed.all_reduce_mean(torch.stack([correct.float(), torch.tensor(float(count), device=dev)]))
            hist["epoch"].append(epoch)
            hist["loss"].append(loss_sum / (steps_per_epoch * b))
            hist["pretext_acc"].append(100.0 * float(stats[0]) / max(1.0, float(stats[1])))
            hist["lr"].append(lr)
            if (config.knn_every and epoch % config.knn_every == 0) or epoch == config.epochs:
                if not hist["knn_epoch"] or hist["knn_epoch"][-1] != epoch:
                    knn(epoch)
            bar.set_postfix(loss=f"{hist['loss'][-1]:.3f}",
                            knn=f"{hist['knn_acc'][-1]:.1f}" if hist["knn_acc"] else "-")
            if on_epoch is not None:
                on_epoch(epoch, hist)
            save(epoch)  # after on_epoch, so that what it adds to the history is saved too
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
    K=4096,               # queue size
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
    out=None,             # run directory: metrics.json and checkpoint.pt (None: write nothing)
    resume=False,         # continue from out/checkpoint.pt
    overwrite=False,      # start afresh even if out/checkpoint.pt exists
)

_TRAIN_KEYS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "knn_every", "knn_k", "knn_t",
               "channels_last", "amp", "seed", "compile")
# settings that may differ between a run and its resumption (more epochs: the lr schedule is stretched)
_RUNTIME_KEYS = {"device", "out", "resume", "overwrite", "download", "data_root", "compile", "knn_every", "amp",
                 "channels_last", "epochs"}


def _check_data_name(name) -> None:
    from .data import DATASET_NAMES

    if not isinstance(name, str) or not name:
        raise ValueError(f"data must be a dataset name, got {name!r}")
    if name.lower() in DATASET_NAMES or name.lower().startswith("imagefolder:") or os.path.isdir(name):
        return
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
    if not float(cfg["T"]) > 0:
        raise ValueError(f"T (temperature) must be > 0, got {cfg['T']}")
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

    Returns:
        :class:`PretrainResult`. ``metrics`` has ``knn_acc`` (final, %), ``knn_history`` ([epoch, acc] pairs),
        ``loss_history``, ``pretext_acc_history``, ``images_per_second``, ``train_seconds``, ``epochs``,
        ``config``, ``device``, ``world_size``, ``num_images``.

    Raises:
        ValueError: bad settings; FileNotFoundError: missing data; CheckpointError: a bad checkpoint, an
        existing one without ``resume``/``overwrite``, or one from different settings; NonFiniteLossError.
    """
    settings = {**(config or {}), **options}
    cfg = resolve_config(**settings)
    created, ddp_device = distributed.init_from_env(cfg["device"])
    try:
        main = distributed.is_main_process()
        dev = ddp_device or get_device(cfg["device"], verbose=verbose)
        seed_everything(cfg["seed"])
        out = Path(cfg["out"]) if cfg["out"] else None
        ckpt = out / "checkpoint.pt" if out is not None else None
        state = None
        if cfg["resume"]:
            state = load_checkpoint(ckpt)
            saved = state.get("config") or {}
            diff = sorted(k for k in DEFAULTS if k not in _RUNTIME_KEYS and k in saved and saved[k] != cfg[k])
            if diff:
                raise CheckpointError(f"{ckpt} was written with other settings: "
                                      + ", ".join(f"{k}={saved[k]!r} (now {cfg[k]!r})" for k in diff)
                                      + "; resume with the same command, or start a new --out")
        elif ckpt is not None and ckpt.exists() and not cfg["overwrite"]:
            raise CheckpointError(f"{ckpt} already exists: pass resume=True (--resume) to continue that run, "
                                  f"overwrite=True (--overwrite) to start afresh, or choose another out directory")
        images, eval_data = load_pretrain_data(cfg, verbose=verbose and main)
        model = build_model(cfg)
        from .data import BatchAugment

        augment = BatchAugment(image_size=cfg["image_size"] or images.shape[-1], preset=cfg["augment"]).to(dev)
        tc = TrainConfig(**{k: cfg[k] for k in _TRAIN_KEYS})

        def report(epoch, hist):
            if verbose and main:
                from tqdm.auto import tqdm

                knn = f", kNN {hist['knn_acc'][-1]:.1f} %" if hist["knn_epoch"] and hist["knn_epoch"][-1] == epoch else ""
                tqdm.write(f"epoch {epoch}/{tc.epochs}: loss {hist['loss'][-1]:.3f}, "
                           f"pretext acc {hist['pretext_acc'][-1]:.1f} %{knn}")
            if on_epoch is not None:
                on_epoch(epoch, hist)

        hist = fit(model, images, augment, tc, eval_data=eval_data, device=dev, on_epoch=report,
                   desc=f"MoCo {cfg['arch']}", verbose=False, checkpoint=ckpt, resume=state, run_config=cfg)
        metrics = {
            "knn_acc": hist["knn_acc"][-1] if hist["knn_acc"] else None,
            "knn_history": [[e, a] for e, a in zip(hist["knn_epoch"], hist["knn_acc"])],
            "loss_history": hist["loss"],
            "pretext_acc_history": hist["pretext_acc"],
            "images_per_second": hist["images_per_second"],
            "train_seconds": hist["train_seconds"],
            "epochs": len(hist["epoch"]),
            "config": cfg,
            "device": hist["device"],
            "world_size": distributed.world_size(),
            "num_images": int(images.shape[0]),
        }
        if out is not None and main:
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / ".metrics.json.tmp"
            tmp.write_text(json.dumps(metrics, indent=2))
            os.replace(tmp, out / "metrics.json")
        distributed.barrier()
        return PretrainResult(metrics=metrics, history=hist, model=model, config=cfg)
    finally:
        if created:
            distributed.cleanup()

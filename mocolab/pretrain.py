"""The pre-training recipe behind ``mocolab pretrain``: presets, settings, data, model, run directory.

:func:`pretrain` resolves a configuration (a preset such as the official CIFAR-10 demo's, a MoCo
version, explicit options: :func:`resolve_config`), loads the data (:func:`load_pretrain_data`),
chooses a queue size that fits it (:func:`choose_queue_size`), builds :class:`~mocolab.moco.MoCo`
(:func:`build_model`), trains it with :func:`mocolab.train.fit` and writes ``metrics.json`` and
``checkpoint.pt`` into its run directory, which it holds alone (:func:`mocolab.checkpoint.lock_run_dir`).

Letters: N dataset size, B (global) batch size, K queue size.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .checkpoint import CheckpointError, load_checkpoint, lock_run_dir, remove_orphan_temporaries, to_plain
from .device import get_device, seed_everything
from .train import TrainConfig, fit

__all__ = ["pretrain", "resolve_config", "choose_queue_size", "build_model", "load_pretrain_data", "PRESETS",
           "VERSIONS", "DEFAULTS", "PretrainResult"]


#: Named recipes. ``cifar10-colab`` is the official MoCo CIFAR-10 demo (facebookresearch/moco, colab
#: notebook); ``cpu-small`` is a ConvNet version of it that runs on a laptop CPU in minutes, with half the
#: demo's lr (on 3,000 CIFAR-10 photos, 30 epochs at batch 256: lr 0.03 49.1 %, 0.06 47.4 %, 0.12 38.7 % kNN).
PRESETS: dict[str, dict] = {
    "cpu-small": dict(data="shapes", arch="convnet", dim=128, K=4096, m=0.99, T=0.1, mlp=False, augment="v2",
                      symmetric=False, shuffle_bn="split", bn_splits=8, epochs=20, batch_size=256, lr=0.03,
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
    from .datasets import DATASET_NAMES

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
    """The full settings of a pre-training run.

    Layered: :data:`DEFAULTS` < ``PRESETS[preset]`` < ``VERSIONS[version]`` < options.

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
    k_fit = 1 << max(0, int(per_epoch // 2).bit_length() - 1)  # largest power of two <= per_epoch / 2
    k_fit = max(k_fit, keys_per_step)
    if k_fit >= per_epoch:
        raise ValueError(f"{num_images} training images are too few for batch_size {batch_size}: the queue must hold "
                         f"at least one batch of keys ({keys_per_step}) and fewer keys than an epoch enqueues "
                         f"({per_epoch}); lower --batch-size to {max(1, num_images // 4)} or less")
    if K >= per_epoch:
        if explicit:
            raise ValueError(f"K {K} is not below the {per_epoch} keys an epoch enqueues ({num_images} images"
                             f"{', both views' if symmetric else ''}): the queue would hold each image's own "
                             f"earlier key as a negative; choose --K below {per_epoch}, e.g. {k_fit}")
    elif explicit or K <= k_fit:
        return K, None
    return k_fit, (f"queue size K {k_fit} instead of the preset's {K}: {num_images} training images enqueue "
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
    from .datasets import load_images

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
        on_epoch: passed to :func:`~mocolab.train.fit`.
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
    tmp.write_text(json.dumps(obj, indent=2, default=to_plain))
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
    from .augment import BatchAugment

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

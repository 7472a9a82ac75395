"""The ``mocolab`` command: ``mocolab pretrain …`` (also ``python -m mocolab pretrain …``).

Examples::

    mocolab pretrain                                   # ConvNet on the bundled shapes, a few CPU minutes
    mocolab pretrain --preset cifar10-colab --download --out runs/c10     # the official CIFAR-10 demo recipe
    mocolab pretrain --preset cifar10-colab --version v2 --symmetric --out runs/c10v2
    mocolab pretrain --preset cifar10-colab --out runs/c10 --resume       # continue after an interruption
    torchrun --nproc_per_node 4 -m mocolab pretrain --preset cifar10-colab --out runs/c10

Settings are layered: the preset's values, then what ``--version`` changes (v1: linear head, v1
augmentation, T 0.07, step schedule; v2: MLP head, v2 augmentation, T 0.2, cosine), then the
options given. The run directory ``--out`` receives ``metrics.json`` and ``checkpoint.pt``
(rewritten atomically every ``--save-every`` epochs or 10 minutes, at the end and on Ctrl-C).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from . import checks

__all__ = ["main", "build_parser"]


def _checked_int(check):
    """An argparse type: the option's text as an int, checked by ``check`` (one of :mod:`mocolab.checks`).

    argparse names the option: ``argument --K: the value must be a positive integer, got '2.5'``.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = text  # not a whole number: the check refuses it and quotes it
        try:
            return check(value, "the value")
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = check.__name__
    return parse


_positive_int = _checked_int(checks.positive_int)
_nonneg_int = _checked_int(checks.nonneg_int)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mocolab`` command."""
    from .encoders import ENCODERS
    from .moco import SHUFFLE_BN_MODES
    from .pretrain import DEFAULTS, PRESETS, VERSIONS

    parser = argparse.ArgumentParser(prog="mocolab", description="mocolab: contrastive self-supervised learning "
                                     "up to Momentum Contrast (MoCo).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("pretrain", help="pre-train MoCo (v1/v2) on a dataset, with a kNN monitor and checkpoints",
                       description=__doc__.replace("``", "").replace("::", ":"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe = p.add_argument_group("recipe")
    recipe.add_argument("--preset", choices=list(PRESETS), default="cpu-small",
                        help="cpu-small: ConvNet on the bundled shapes (default); cifar10-colab: the official "
                             "CIFAR-10 demo (ResNet-18, K 4096, m 0.99, T 0.1, batch 512, lr 0.06 cosine, wd 5e-4, "
                             "split-BN 8, 200 epochs)")
    recipe.add_argument("--version", choices=list(VERSIONS), help="MoCo v1 or v2 on top of the preset")
    recipe.add_argument("--symmetric", action="store_true", default=None, help="symmetric loss (both views as query)")
    data = p.add_argument_group("data")
    data.add_argument("--data",
                      help="shapes | cifar10 | stl10 | cifar10-small | imagefolder:PATH (default: the preset's)")
    data.add_argument("--data-root", help="download directory for cifar10/stl10 (default $MOCOLAB_DATA or data/)")
    data.add_argument("--download", action="store_true", default=None, help="download cifar10/stl10 if missing")
    data.add_argument("--limit", type=_positive_int, help="train on a class-balanced subset of this many images "
                      "(the kNN monitor then uses limit/5 test images)")
    data.add_argument("--image-size", type=_positive_int, help="side of the training views (default: the images')")
    model = p.add_argument_group("model")
    model.add_argument("--arch", choices=list(ENCODERS), help="encoder (default: the preset's)")
    model.add_argument("--dim", type=_positive_int, help=f"feature dimension C (default {DEFAULTS['dim']})")
    model.add_argument("--K", type=_positive_int, help="queue size")
    model.add_argument("--m", type=_finite_float, help="key-encoder momentum in [0, 1]")
    model.add_argument("--T", type=_finite_float, help="softmax temperature > 0")
    model.add_argument("--shuffle-bn", choices=list(SHUFFLE_BN_MODES), help="how to shuffle BN (split: SplitBatchNorm "
                       "on one device; ddp: across processes)")
    model.add_argument("--bn-splits", type=_positive_int, help="SplitBatchNorm groups")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=_positive_int)
    opt.add_argument("--batch-size", type=_positive_int, help="global batch size (over all processes)")
    opt.add_argument("--lr", type=_finite_float, help="SGD learning rate")
    opt.add_argument("--weight-decay", type=_nonneg_float, help="SGD weight decay >= 0")
    opt.add_argument("--schedule", choices=["cosine", "step", "constant"])
    opt.add_argument("--knn-every", type=_nonneg_int, help="kNN monitor every N epochs (0: only at the end)")
    opt.add_argument("--seed", type=_nonneg_int, help="random seed, an integer >= 0")
    run = p.add_argument_group("run")
    run.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    run.add_argument("--channels-last", action="store_true", default=None, help="channels_last memory format")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                     help="bf16 autocast (default: on for CUDA)")
    run.add_argument("--compile", action="store_true", default=None, help="torch.compile the encoders")
    run.add_argument("--out", help="run directory for metrics.json and checkpoint.pt")
    run.add_argument("--save-every", type=_nonneg_int, metavar="N",
                     help=f"write OUT/checkpoint.pt every N epochs (0: only at the end; default "
                          f"{DEFAULTS['save_every']}), also every {DEFAULTS['save_every_seconds'] // 60} minutes, "
                          f"at the end and on Ctrl-C")
    run.add_argument("--resume", action="store_true", default=None, help="continue from OUT/checkpoint.pt")
    run.add_argument("--overwrite", action="store_true", default=None,
                     help="start afresh even if OUT/checkpoint.pt exists")
    run.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    parser.pretrain_parser = p  # for error messages in the subcommand's name
    return parser


_KEYS = {"symmetric": "symmetric", "data": "data", "data_root": "data_root", "download": "download",
         "limit": "limit", "image_size": "image_size", "arch": "arch", "dim": "dim", "K": "K", "m": "m", "T": "T",
         "shuffle_bn": "shuffle_bn", "bn_splits": "bn_splits", "epochs": "epochs", "batch_size": "batch_size",
         "lr": "lr", "weight_decay": "weight_decay", "schedule": "schedule", "knn_every": "knn_every",
         "seed": "seed", "device": "device", "channels_last": "channels_last", "amp": "amp", "compile": "compile",
         "out": "out", "resume": "resume", "overwrite": "overwrite", "save_every": "save_every"}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mocolab`` console script. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .checkpoint import CheckpointError
    from .pretrain import pretrain, resolve_config
    from .train import NonFiniteLossError

    options = {key: getattr(args, attr) for attr, key in _KEYS.items()}
    options = {k: v for k, v in options.items() if v is not None}
    try:
        resolve_config(preset=args.preset, version=args.version, **options)  # fail fast, before any import
    except ValueError as err:
        parser.pretrain_parser.error(str(err))
    try:
        result = pretrain(preset=args.preset, version=args.version, verbose=not args.quiet, **options)
    except (ValueError, FileNotFoundError, CheckpointError, NonFiniteLossError) as err:
        print(f"mocolab pretrain: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        where = f"; continue with --resume (checkpoint in {args.out})" if args.out else ""
        print(f"mocolab pretrain: interrupted{where}", file=sys.stderr)
        return 130
    m = result.metrics
    if int(os.environ.get("RANK", "0")) == 0 and not args.quiet:
        knn = f"kNN {m['knn_acc']:.1f} %, " if m["knn_acc"] is not None else ""
        print(f"done: {m['epochs']} epochs, {knn}{m['images_per_second']:.0f} images/s on {m['device']}"
              + (f" x{m['world_size']}" if m["world_size"] > 1 else "")
              + (f"; wrote {args.out}/metrics.json and checkpoint.pt" if args.out else ""))
    return 0

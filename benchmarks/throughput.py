#!/usr/bin/env python
"""Side by side, in one run: images/s of the MoCo training step, of the augmentation alone and of the
kNN monitor, host syncs per step, and the projected time of the CIFAR-10 demo (200 epochs) end to end.

- step: ``mocolab.train.fit`` (the loop behind ``mocolab pretrain``: views, forward, backward, SGD) over
  whole epochs of synthetic uint8 images kept on the device, no monitor, no checkpoint; timed per
  epoch (CUDA events on a GPU, no per-step hook), the first epoch dropped as warm-up;
- augment: ``BatchAugment`` making a step's 2N views, as two calls on N images and as one call on 2N;
- kNN: the monitor as ``fit`` runs it (feature extraction of the bank and the queries, then the
  weighted kNN search), in images/s over bank + queries;
- syncs/step: host syncs (reads of a device value on the host) of ``fit``'s loop, counted over two
  runs of different lengths, so that what happens once per epoch cancels out;
- save: one checkpoint write (``save_checkpoint``, fsync included).

CPU defaults are small (ConvNet width 32, 32 px, batch 128); ``--device cuda`` takes the demo recipe
(CIFAR ResNet-18, batch 512, K 4096, split-BN 8, bf16 autocast), a 50,000-image bank and 10,000 queries.
Pin the threads for comparable CPU figures (``OMP_NUM_THREADS=1 ... --threads 1``).

    OMP_NUM_THREADS=1 python benchmarks/throughput.py --threads 1
    python benchmarks/throughput.py --device cuda [--channels-last] [--compile]
    python benchmarks/throughput.py --device cuda --epochs 3 --num-images 50000 --end-to-end   # gpu_check.sh

Works against older versions of mocolab too (it detects what ``fit`` and the monitor support).
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from functools import partial

import torch

os.environ.setdefault("MOCOLAB_QUIET", "1")  # no progress bars
from mocolab.augment import BatchAugment
from mocolab.device import get_device
from mocolab.encoders import ConvNet
from mocolab.moco import MoCo
from mocolab.pretrain import build_model, resolve_config
from mocolab.train import TrainConfig, fit, make_optimizer

try:  # the library's counter, where it has one
    from mocolab.syncs import count_host_syncs as _library_counter
except ImportError:
    _library_counter = None


# -- host syncs ------------------------------------------------------------------------------------
_SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero", "aten::allclose",
             "aten::_unique2", "aten::unique_consecutive", "aten::masked_select"}


@contextlib.contextmanager
def _count_host_syncs():
    """Counts the ops that read a device value on the host (``.item()``, ``float()``, ``bool()``, nonzero,
    a copy to the CPU from another device); ``.count`` and ``.ops`` (a Counter by op name)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Mode(TorchDispatchMode):
        count, ops = 0, Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func._schema.name
            hit = name in _SYNC_OPS
            if name in ("aten::_to_copy", "aten::copy_") and args and isinstance(args[0], torch.Tensor):
                src = args[1] if name == "aten::copy_" else args[0]
                dst = args[0].device if name == "aten::copy_" else kwargs.get("device") or args[0].device
                hit = isinstance(src, torch.Tensor) and src.device.type != "cpu" and torch.device(dst).type == "cpu"
            if hit:
                Mode.count += 1
                Mode.ops[name] += 1
            return func(*args, **kwargs)

    mode = Mode()
    with mode:
        yield mode


def _sync_count(c) -> int:
    for attr in ("count", "syncs", "total"):
        if hasattr(c, attr):
            return int(getattr(c, attr))
    return len(c) if hasattr(c, "__len__") else int(c)


def count_host_syncs():
    return _library_counter() if _library_counter is not None else _count_host_syncs()


# -- the pieces --------------------------------------------------------------------------------------
def _model(args, dev):
    torch.manual_seed(0)
    if args.arch == "convnet":
        return MoCo(partial(ConvNet, width=args.width), dim=128, K=4096, m=0.99, T=0.1, shuffle_bn="split",
                    bn_splits=8)
    return build_model(resolve_config("cifar10-colab", arch=args.arch, device=str(dev)))


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _fit_kwargs(**kw) -> dict:
    """Only the keyword arguments this version of ``fit`` / ``TrainConfig`` knows."""
    return {k: v for k, v in kw.items() if k in inspect.signature(fit).parameters}


def _config(**kw) -> TrainConfig:
    known = set(inspect.signature(TrainConfig).parameters)
    return TrainConfig(**{k: v for k, v in kw.items() if k in known})


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure_step(args, dev, images, eval_data=None, checkpoint=None) -> dict:
    """Seconds per epoch of ``fit`` (median over epochs 2..E), timed at the epoch boundaries."""
    model = _model(args, dev)
    stamps = []

    def on_epoch(epoch, hist):
        if dev.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            stamps.append(ev)
        else:
            stamps.append(time.perf_counter())

    cfg = _config(epochs=args.epochs, batch_size=args.batch_size, lr=0.06, knn_every=1 if eval_data else 0,
                  amp=args.amp, channels_last=args.channels_last, compile=args.compile, save_every=1)
    if dev.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    hist = fit(model, images, BatchAugment(32, preset="v2").to(dev), cfg, eval_data=eval_data, device=dev,
               on_epoch=on_epoch, verbose=False, desc=args.arch, **_fit_kwargs(checkpoint=checkpoint))
    _sync(dev)
    wall = time.perf_counter() - t0
    if dev.type == "cuda":
        times = [a.elapsed_time(b) / 1000 for a, b in zip([start] + stamps, stamps)]
    else:
        times = [b - a for a, b in zip([t0] + stamps, stamps)]
    epoch_s = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {"epoch_s": epoch_s, "first_epoch_s": times[0], "epochs": len(times), "wall_s": wall,
            "loss_finite": all(v == v and abs(v) != float("inf") for v in hist["step_loss"]),
            "knn_acc": hist["knn_acc"][-1] if hist["knn_acc"] else None}


def measure_augment(args, dev, reps: int) -> dict:
    """Seconds to make one step's 2N views: two calls on N images, and one call on 2N."""
    aug = BatchAugment(32, preset="v2").to(dev)
    x = _images(args.batch_size).to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    variants = {"two_calls": lambda: (aug(x, generator=gen), aug(x, generator=gen)),
                "one_call_2n": lambda: aug(torch.cat([x, x]), generator=gen).chunk(2)}
    out = {}
    for name, fn in variants.items():
        for _ in range(2):
            fn()
        _sync(dev)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts)
    return out


def measure_knn(args, dev, bank_n: int, test_n: int, reps: int) -> dict:
    """Seconds of one kNN monitor pass as ``fit`` runs it (extraction of bank and queries, then the search)."""
    from mocolab import evaluate

    enc = _model(args, dev).encoder_q
    if args.channels_last:
        enc.to(memory_format=torch.channels_last)
    bank_x, test_x = _images(bank_n, seed=1), _images(test_n, seed=2)
    bank_y, test_y = torch.arange(bank_n) % 10, torch.arange(test_n) % 10
    params = inspect.signature(evaluate.extract_features).parameters
    on_device = "amp" in params  # this version keeps the monitor on the training device
    amp = args.amp if args.amp is not None else dev.type == "cuda"
    if on_device:
        bank_x, bank_y, test_x, test_y = (t.to(dev) for t in (bank_x, bank_y, test_x, test_y))
        kw = dict(batch_size=1024, amp=amp, channels_last=args.channels_last)
    else:
        kw = {}

    def run():
        f_bank = evaluate.extract_features(enc, bank_x, **kw)
        f_test = evaluate.extract_features(enc, test_x, **kw)
        return evaluate.knn_accuracy(f_bank, bank_y, f_test, test_y, k=200, t=0.1, num_classes=10)

    run()
    ts = []
    for _ in range(reps):
        _sync(dev)
        t0 = time.perf_counter()
        run()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return {"knn_s": statistics.median(ts), "on_device": on_device, "bank": bank_n, "queries": test_n}


def measure_syncs(args, dev) -> dict:
    """Host syncs per step of ``fit``'s loop (no monitor, no checkpoint, no on_step): the difference of two
    one-epoch runs of S1 and S2 steps, divided by S2 - S1 (per-epoch syncs cancel out)."""
    b = 32 if dev.type == "cpu" else args.batch_size
    counts, ops = {}, {}
    for steps in (2, 6):
        model = _model(args, dev)
        images = _images(b * steps)
        cfg = _config(epochs=1, batch_size=b, lr=0.06, knn_every=0, amp=args.amp, channels_last=args.channels_last)
        with count_host_syncs() as c:
            fit(model, images, BatchAugment(32, preset="v2").to(dev), cfg, device=dev, verbose=False)
        counts[steps] = _sync_count(c)
        ops[steps] = Counter(getattr(c, "ops", None) or getattr(c, "by_method", None) or {})
    per_op = {k: (ops[6][k] - ops[2][k]) / 4 for k in ops[6] if ops[6][k] != ops[2][k]}
    return {"syncs_per_step": (counts[6] - counts[2]) / 4,
            "syncs_per_epoch_and_setup": counts[2] - 2 * (counts[6] - counts[2]) / 4,
            "per_op": per_op, "counter": "mocolab.syncs" if _library_counter else "benchmarks/throughput.py"}


def measure_save(args, dev, reps: int = 3) -> float:
    """Seconds of one checkpoint write of the model and its optimizer (fsync included)."""
    from mocolab.checkpoint import clean_state_dict, save_checkpoint

    model = _model(args, dev).to(dev)
    opt = make_optimizer(model, TrainConfig())
    for p in model.parameters():
        if p.requires_grad:
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    ts = []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(reps):
            t0 = time.perf_counter()
            save_checkpoint(os.path.join(d, "c.pt"), {"model": clean_state_dict(model.state_dict()),
                                                       "optimizer": opt.state_dict()})
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--arch",
                    help="convnet | resnet18-cifar | ... (default: convnet on a CPU, resnet18-cifar on a GPU)")
    ap.add_argument("--width", type=int, default=32, help="ConvNet width")
    ap.add_argument("--batch-size", type=int, help="default: 512 on a GPU (the recipe), 128 on a CPU")
    ap.add_argument("--steps", type=int, help="steps per timed epoch (default: 40 on a GPU, 4 on a CPU)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the step timing (the first is warm-up)")
    ap.add_argument("--num-images", type=int, help="images per epoch (overrides --steps; CIFAR-10: 50000)")
    ap.add_argument("--knn-bank", type=int, help="kNN bank size (default: 50000 on a GPU, 2048 on a CPU)")
    ap.add_argument("--knn-queries", type=int, help="kNN queries (default: 10000 on a GPU, 512 on a CPU)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the augmentation and kNN timings")
    ap.add_argument("--end-to-end", action="store_true",
                    help="also run fit with the kNN monitor and a checkpoint every epoch (the projection's check)")
    ap.add_argument("--save-every", type=int, default=10, help="epochs between checkpoints in the projection")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast (default: on for CUDA)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--no-syncs", action="store_true", help="skip the sync count")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = get_device(args.device, verbose=False)
    gpu = dev.type == "cuda"
    args.arch = args.arch or ("resnet18-cifar" if gpu else "convnet")
    args.batch_size = args.batch_size or (512 if gpu else 128)
    n = args.num_images or args.batch_size * (args.steps or (40 if gpu else 4))
    steps = n // args.batch_size
    bank_n, test_n = args.knn_bank or (50000 if gpu else 2048), args.knn_queries or (10000 if gpu else 512)
    head = (f"{torch.cuda.get_device_name(dev)}" if gpu else f"CPU, {torch.get_num_threads()} threads "
            f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    print(f"{head}; torch {torch.__version__}; {args.arch}{f' width {args.width}' if args.arch == 'convnet' else ''}, "
          f"batch {args.batch_size}, {steps} steps/epoch x {args.epochs} epochs, amp "
          f"{args.amp if args.amp is not None else gpu}, channels_last {args.channels_last}, compile {args.compile}")

    r = {"device": str(dev), "arch": args.arch, "batch_size": args.batch_size, "steps_per_epoch": steps}
    step = measure_step(args, dev, _images(n))
    r["step_images_per_s"] = steps * args.batch_size / step["epoch_s"]
    r["first_epoch_s"], r["loss_finite"] = step["first_epoch_s"], step["loss_finite"]
    aug = measure_augment(args, dev, args.reps)
    r["augment_views_per_s"] = {k: 2 * args.batch_size / v for k, v in aug.items()}
    knn = measure_knn(args, dev, bank_n, test_n, args.reps)
    r["knn_images_per_s"] = (bank_n + test_n) / knn["knn_s"]
    r["knn_s"], r["knn_on_device"] = knn["knn_s"], knn["on_device"]
    r["save_s"] = measure_save(args, dev)
    if not args.no_syncs:
        r.update(measure_syncs(args, dev))
    # the CIFAR-10 demo: 200 epochs of 50,000 images, kNN (50k bank, 10k queries) every epoch
    epoch_train = 50000 / r["step_images_per_s"]
    epoch_knn = 60000 / r["knn_images_per_s"]
    r["projected_200_epochs_min"] = (200 * (epoch_train + epoch_knn) + 200 / args.save_every * r["save_s"]) / 60
    r["projected_parts_min"] = {"train": 200 * epoch_train / 60, "knn": 200 * epoch_knn / 60,
                                "checkpoints": 200 / args.save_every * r["save_s"] / 60}
    if args.end_to_end:  # the real thing: fit with the monitor and a checkpoint every epoch
        with tempfile.TemporaryDirectory() as d:
            e2e = measure_step(args, dev, _images(n), eval_data=(_images(n), torch.arange(n) % 10,
                               _images(test_n, seed=2), torch.arange(test_n) % 10), checkpoint=os.path.join(d, "c.pt"))
        r["end_to_end_epoch_s"] = e2e["epoch_s"]
        r["end_to_end_projected_200_epochs_min"] = 200 * e2e["epoch_s"] * 50000 / n / 60
    if gpu:
        r["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30

    a = r["augment_views_per_s"]
    rows = [("training step (fit, augmentation included)", f"{r['step_images_per_s']:10.0f} images/s"),
            ("augmentation, 2 calls of N", f"{a['two_calls']:10.0f} views/s"),
            ("augmentation, 1 call of 2N",
             f"{a['one_call_2n']:10.0f} views/s  (x{a['one_call_2n'] / a['two_calls']:.2f})"),
            (f"kNN monitor ({bank_n} bank + {test_n} queries{', on the device' if knn['on_device'] else ''})",
             f"{r['knn_images_per_s']:10.0f} images/s ({r['knn_s']:.2f} s)"),
            ("checkpoint write", f"{r['save_s']:10.3f} s")]
    if "syncs_per_step" in r:
        rows.append((f"host syncs per step ({r['counter']})", f"{r['syncs_per_step']:10.1f}"))
    rows.append(("augmentation / step time (1 call of 2N)",
                 f"{200 * r['step_images_per_s'] / a['one_call_2n']:10.1f} %"))
    rows.append(("kNN pass / training epoch (CIFAR-10 sizes)", f"{100 * epoch_knn / epoch_train:10.1f} %"))
    rows.append((f"200 epochs projected (kNN every epoch, checkpoint every {args.save_every})",
                 f"{r['projected_200_epochs_min']:10.1f} min"))
    if args.end_to_end:
        rows.append(("200 epochs from fit with kNN + checkpoint every epoch",
                     f"{r['end_to_end_projected_200_epochs_min']:10.1f} min"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if r.get("per_op"):
        print("  syncs per step by op: " + ", ".join(f"{k} {v:g}" for k, v in sorted(r["per_op"].items())))
    print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return r


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

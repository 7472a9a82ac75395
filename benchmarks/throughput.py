#!/usr/bin/env python
"""Images per second of the whole MoCo training step, augmentation included, on this machine.

Runs ``mocolab.train.fit`` (the loop behind ``mocolab pretrain`` and the notebooks) with the
CIFAR-10 demo recipe (``--preset cifar10-colab``: K 4096, m 0.99, T 0.1, split-BN 8) for the
CIFAR ResNet-18 and the ConvNet, on synthetic uint8 32x32 images kept on the device. Each
step is timed (the first ``--warmup`` steps are dropped); the batched augmentation is timed
on its own too, so the share of the step spent making views is reported. Prints images/s and
the projected time of 200 CIFAR-10 epochs (50,000 images each), plus one JSON line.

    python benchmarks/throughput.py                          # both encoders, CPU-sized batches
    python benchmarks/throughput.py --device cuda --batch-size 512 --amp --channels-last --compile
    python benchmarks/throughput.py --epochs 3 --num-images 50000 --device cuda   # whole epochs (gpu_check.sh)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from mocolab.data import BatchAugment
from mocolab.device import get_device
from mocolab.train import TrainConfig, build_model, fit, resolve_config


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class TimedAugment(nn.Module):
    """Wraps an augmentation and adds up the (synchronised) time spent in it."""

    def __init__(self, inner: nn.Module, dev: torch.device):
        super().__init__()
        self.inner, self.dev, self.seconds, self.calls = inner, dev, 0.0, 0

    def forward(self, x, generator=None):
        _sync(self.dev)
        t0 = time.perf_counter()
        out = self.inner(x, generator=generator)
        _sync(self.dev)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def measure(arch: str, dev: torch.device, batch_size: int, steps: int, warmup: int, amp: bool | None,
            channels_last: bool, compile: bool, epochs: int | None = None, num_images: int | None = None,
            knn: bool = False) -> dict:
    """Time ``fit`` on synthetic CIFAR-sized data; returns images/s, augmentation share, memory, projections."""
    cfg = resolve_config("cifar10-colab", arch=arch, batch_size=batch_size, device=str(dev))
    torch.manual_seed(0)
    model = build_model(cfg)
    n = num_images or batch_size * (steps + warmup)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    eval_data = None
    if knn:  # a kNN monitor of CIFAR-10's size (50k bank, 10k queries) at the end
        labels = torch.randint(0, 10, (n,))
        eval_data = (images, labels, images[:10000], labels[:10000])
    aug = TimedAugment(BatchAugment(32, preset=cfg["augment"]), dev).to(dev)
    stamps = []

    def on_step(state):
        _sync(dev)
        stamps.append(time.perf_counter())

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    tc = TrainConfig(epochs=epochs or 1, batch_size=batch_size, lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                     knn_every=0, amp=amp, channels_last=channels_last, compile=compile)
    t_start = time.perf_counter()
    hist = fit(model, images, aug, tc, eval_data=eval_data, device=dev, on_step=on_step, verbose=False,
               desc=arch)
    wall = time.perf_counter() - t_start
    timed = stamps[max(0, warmup - 1):]  # the stamp after the last warm-up step starts the first timed step
    step_times = [b - a for a, b in zip(timed, timed[1:])]
    step = statistics.median(step_times) if step_times else float("nan")
    ips = batch_size / step
    return {
        "arch": arch, "device": str(dev), "batch_size": batch_size, "amp": bool(amp if amp is not None else dev.type == "cuda"),
        "channels_last": channels_last, "compile": compile, "steps_timed": len(step_times),
        "median_step_s": step, "images_per_second": ips,
        "augment_share": aug.seconds / max(1e-9, hist["train_seconds"]),
        "fit_images_per_second": hist["images_per_second"], "wall_s": wall,
        "knn_s": (wall - hist["train_seconds"]) if knn else None,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        "projected_200_epochs_h": 200 * 50000 / ips / 3600,
        "loss_finite": all(v == v for v in hist["step_loss"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["resnet18-cifar", "convnet"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, help="default: 512 on a GPU (the recipe), 64 on a CPU")
    ap.add_argument("--steps", type=int, help="timed steps (default: 20 on a GPU, 4 on a CPU)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps (compilation, allocator)")
    ap.add_argument("--epochs", type=int, help="run whole epochs over --num-images instead of --steps")
    ap.add_argument("--num-images", type=int, help="dataset size for --epochs (CIFAR-10: 50000)")
    ap.add_argument("--knn", action="store_true", help="also time a CIFAR-sized kNN monitor (with --epochs)")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on for CUDA)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = get_device(args.device)
    gpu = dev.type == "cuda"
    batch = args.batch_size or (512 if gpu else 64)
    steps = args.steps or (20 if gpu else 4)
    if gpu:
        print(f"GPU: {torch.cuda.get_device_name(dev)}")
    results = []
    for arch in args.arch:
        r = measure(arch, dev, batch, steps, args.warmup, args.amp, args.channels_last, args.compile,
                    epochs=args.epochs, num_images=args.num_images, knn=args.knn)
        results.append(r)
        mem = f", peak GPU memory {r['peak_gpu_memory_gib']:.2f} GiB" if r["peak_gpu_memory_gib"] is not None else ""
        knn = f", kNN monitor {r['knn_s']:.1f} s" if r["knn_s"] is not None else ""
        print(f"{arch:15s} batch {batch}: {r['images_per_second']:8.1f} images/s (median step {r['median_step_s']:.3f} s, "
              f"{r['steps_timed']} steps), augmentation {100 * r['augment_share']:.1f} % of step time{mem}{knn}; "
              f"200 CIFAR-10 epochs: {r['projected_200_epochs_h']:.2f} h")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

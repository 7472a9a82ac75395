"""Speed of the data path: generating shapes, loading an ImageFolder, batched augmentation.

Usage::

    python benchmarks/data_speed.py                 # best device, 2 CPU threads
    python benchmarks/data_speed.py --device cpu --threads 1 --batch-size 256

Prints milliseconds per call (the best of ``--repeats`` runs, after a warm-up)
for BatchAugment at 32, 96 and 224 pixels with the v1 and v2 presets, the
torchvision PIL pipeline on the same images for comparison, make_shapes and,
when it is present, loading cifar10-small from its PNG files.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from mocolab.augment import BatchAugment
from mocolab.datasets import _IMAGEFOLDER_CACHE, load_images, normalization_stats, shared_cifar10_small
from mocolab.device import get_device
from mocolab.shapes import make_shapes


def torchvision_v2(image_size: int = 32):
    """The MoCo v2 recipe as torchvision PIL transforms (no blur at 32 px, as the official CIFAR-10 demo)."""
    from torchvision import transforms as T

    mean, std = normalization_stats(image_size)
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])  # fmt: skip


def best_ms(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = get_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = args.batch_size

    print(f"device {device}, {torch.get_num_threads()} CPU threads, batch {n}")
    for size in (32, 96, 224):
        source = torch.nn.functional.interpolate(make_shapes(n)[0].float(), size=size).to(torch.uint8).to(device)
        for preset in ("v1", "v2"):
            aug = BatchAugment(size, preset=preset).to(device)
            ms = best_ms(partial(aug, source), args.repeats, sync)
            print(f"BatchAugment {preset} {size:3d}px: {ms:8.2f} ms per batch ({n / ms * 1000:,.0f} images/s)")
    pil = torchvision_v2(32)
    from PIL import Image

    images = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in make_shapes(n)[0]]
    ms = best_ms(lambda: [(pil(im), pil(im)) for im in images], max(1, args.repeats // 2))
    print(f"torchvision PIL v2, two crops, 32px: {ms:8.2f} ms per batch (for comparison)")
    ms = best_ms(lambda: make_shapes(10_000), max(1, args.repeats // 2))
    print(f"make_shapes(10000) at 32px: {ms:8.1f} ms")
    if shared_cifar10_small() is not None:

        def load():
            _IMAGEFOLDER_CACHE.clear()
            load_images("cifar10-small")

        ms = best_ms(load, 1)
        print(f"load_images('cifar10-small') (5000 PNGs, uncached): {ms:8.1f} ms")


if __name__ == "__main__":
    main()

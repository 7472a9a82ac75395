#!/usr/bin/env python
"""The CPU recipe on real photos: ``mocolab pretrain`` with its defaults on small CIFAR-10 subsets.

For each seed S, draws a class-balanced subset of ``--per-class`` training photos per class from an
ImageFolder root (``random.Random(S)``, classes in sorted order, each class's files sorted, then
``sample``), links it beside the root's whole test split into ``--work``, and prints, side by side:

- the kNN accuracy of the run's encoder before training (seeded as the run seeds it);
- the kNN accuracy after ``mocolab pretrain --data imagefolder:SUBSET --epochs E --device cpu --seed S``,
  with everything else at its default (or with the options given after ``--``);
- the run's training time.

The kNN figures use the monitor's settings (k 200, t 0.1; the subset is the bank, the test photos
the queries). The README's table "The CPU recipe on real photos" comes from this script:

    python benchmarks/real_photos.py                              # seeds 0 1 2, 30 epochs, the defaults
    python benchmarks/real_photos.py --seeds 2 -- --symmetric     # one change from the defaults
    python benchmarks/real_photos.py --root ~/data/my_photos --per-class 100

The default root is ``../shared/data/cifar10-small`` beside the repository (a class folder per
class under ``train/`` and ``test/``). Run on a quiet machine: the times are wall-clock.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def draw_subset(root: Path, per_class: int, seed: int, dest: Path) -> int:
    """Link ``per_class`` training photos of each class (and the whole test split) under ``dest``."""
    rng = random.Random(seed)
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if not classes:
        raise SystemExit(f"{root / 'train'} has no class folders: expected ROOT/train/CLASS/IMAGE")
    shutil.rmtree(dest, ignore_errors=True)
    total = 0
    for name in classes:
        files = sorted(f.name for f in (root / "train" / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) < per_class:
            raise SystemExit(f"class {name!r} has {len(files)} training photos, fewer than --per-class {per_class}")
        (dest / "train" / name).mkdir(parents=True)
        for f in sorted(rng.sample(files, per_class)):
            _link(root / "train" / name / f, dest / "train" / name / f)
        total += per_class
    _link((root / "test").resolve(), dest / "test")
    return total


def _link(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:  # no symlinks here (some Windows setups): copy instead
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


def random_init_knn(subset: Path, seed: int) -> float:
    """kNN accuracy (%) of the encoder that ``mocolab pretrain --seed seed`` starts from."""
    from mocolab.device import seed_everything
    from mocolab.evaluate import evaluate_knn
    from mocolab.pretrain import build_model, load_pretrain_data, resolve_config

    cfg = resolve_config(data=f"imagefolder:{subset}", seed=seed, device="cpu")
    _, eval_data = load_pretrain_data(cfg, verbose=False)
    seed_everything(seed)
    model = build_model(cfg)
    return evaluate_knn(model.encoder_q, *eval_data, k=cfg["knn_k"], t=cfg["knn_t"])


def main(argv: list[str] | None = None) -> list[tuple]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="options after -- go to mocolab pretrain unchanged")
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "cifar10-small")
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--work", type=Path, default=None, help="where subsets and runs go (default: a temp dir)")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if not (args.root / "train").is_dir() or not (args.root / "test").is_dir():
        raise SystemExit(f"{args.root} must hold train/ and test/ class folders (see --root)")
    work = args.work or Path(tempfile.mkdtemp(prefix="mocolab_real_photos_"))
    rows = []
    for seed in args.seeds:
        subset = work / f"subset{seed}"
        n = draw_subset(args.root, args.per_class, seed, subset)
        before = random_init_knn(subset, seed)
        out = work / f"run{seed}"
        cmd = [sys.executable, "-m", "mocolab", "pretrain", "--data", f"imagefolder:{subset}", "--epochs",
               str(args.epochs), "--device", "cpu", "--seed", str(seed), "--knn-every", "10", "--out", str(out),
               "--overwrite", "--quiet", *extra]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)
        metrics = json.loads((out / "metrics.json").read_text())
        rows.append((seed, n, before, metrics["knn_acc"], metrics["train_seconds"]))
        print(f"subset/seed {seed}: {n} photos, kNN {before:.1f} % -> {metrics['knn_acc']:.1f} % "
              f"in {metrics['train_seconds']:.0f} s", flush=True)
    print(f"\n| subset / seed | random init | after {args.epochs} epochs | train time |\n|---|---|---|---|")
    for seed, _, before, after, seconds in rows:
        print(f"| {seed} | {before:.1f} % | {after:.1f} % | {seconds:.0f} s |")
    if len(rows) > 1:
        mean = sum(r[3] for r in rows) / len(rows)
        print(f"\nmean after training: {mean:.1f} % over {len(rows)} subsets; options: {' '.join(extra) or 'none'}")
    return rows


if __name__ == "__main__":
    main()

"""Whole datasets as one uint8 tensor: the bundled shapes, CIFAR-10, STL-10 and ImageFolders.

:func:`load_images` returns a (small) dataset split as images uint8 ``(N, 3, H, W)``, labels
and class names: the fast path of the notebooks and the trainer, which augment batches on the
device with :class:`~mocolab.augment.BatchAugment`. ``limit`` takes a class-balanced, seeded
subset (:func:`balanced_subset`). :func:`normalization_stats` gives the per-channel mean and std
that go with an image size.

Letter legend: N images, H x W image size, S output size, L classes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checks import choice, nonneg_int
from .shapes import SHAPE_NAMES, SHAPES_DEFAULT_SIZE, SHAPES_NAMES, SHAPES_SPLITS, SHAPES_STYLES, make_shapes

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DATASET_NAMES",
    "load_images",
    "balanced_subset",
    "shared_cifar10_small",
    "default_data_root",
    "normalization_stats",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)  # the values of the official MoCo CIFAR-10 demo
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATASET_NAMES = (*SHAPES_NAMES, "cifar10", "stl10", "cifar10-small")
_CHOICES = ", ".join(f"'{n}'" for n in DATASET_NAMES) + ", 'imagefolder:PATH' or an existing directory"
_REPO_ROOT = Path(__file__).resolve().parents[1]


def normalization_stats(image_size: int = 32) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel: CIFAR-10 statistics up to 64 px, ImageNet statistics above."""
    return (CIFAR10_MEAN, CIFAR10_STD) if image_size <= 64 else (IMAGENET_MEAN, IMAGENET_STD)


def default_data_root() -> Path:
    """Where real datasets are downloaded: ``$MOCOLAB_DATA`` or ``<repo>/data``."""
    env = os.environ.get("MOCOLAB_DATA")
    return Path(env).expanduser() if env else _REPO_ROOT / "data"


def shared_cifar10_small() -> Path | None:
    """The ImageFolder subset of CIFAR-10 used offline by tests, or None when absent.

    Looks at ``$MOCOLAB_CIFAR10_SMALL`` first, then ``../shared/data/cifar10-small``
    relative to the repository root.
    """
    env = os.environ.get("MOCOLAB_CIFAR10_SMALL")
    candidates = [Path(env).expanduser()] if env else []
    candidates.append(_REPO_ROOT / ".." / "shared" / "data" / "cifar10-small")
    for path in candidates:
        if (path / "train").is_dir():
            return path.resolve()
    return None


def _missing(what: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{what} not found under {path}. Pass download=True (--download on the command line) "
        f"to download it there, or set MOCOLAB_DATA to the directory that holds it."
    )


def _shapes_style(name: str | os.PathLike) -> str:
    """The :data:`SHAPES_STYLES` key of a "shapes" dataset name: "shapes-STYLE" -> STYLE, else "gray"."""
    style = os.fspath(name).lower().removeprefix("shapes-")
    return style if style in SHAPES_STYLES else "gray"


def _resolve_name(name: str) -> tuple[str, Path | None]:
    """Map a dataset name to (kind, path) with kind in shapes/cifar10/stl10/imagefolder."""
    if not isinstance(name, (str, os.PathLike)):
        raise ValueError(f"dataset name must be a string, got {type(name).__name__}; choose one of {_CHOICES}")
    name = os.fspath(name)
    key = name.lower()
    if key in ("shapes", "cifar10", "stl10"):
        return key, None
    if key in SHAPES_NAMES:
        return "shapes", None
    if key == "cifar10-small":
        path = shared_cifar10_small()
        if path is None:
            raise FileNotFoundError(
                "cifar10-small not found: expected it at "
                f"{(_REPO_ROOT / '..' / 'shared' / 'data' / 'cifar10-small').resolve()} "
                "or in $MOCOLAB_CIFAR10_SMALL"
            )
        return "imagefolder", path
    if key.startswith("imagefolder:"):
        path = Path(name.split(":", 1)[1]).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"ImageFolder directory does not exist: {path}")
        return "imagefolder", path
    if os.sep in name or name.startswith(".") or Path(name).is_dir():
        path = Path(name).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"ImageFolder directory does not exist: {path}")
        return "imagefolder", path
    raise ValueError(f"unknown dataset {name!r}; choose one of {_CHOICES}")


def _imagefolder_dir(path: Path, split: str) -> Path:
    """The split subfolder (train/val/test) if the folder has one, else the folder itself."""
    if (path / split).is_dir():
        return path / split
    if split in ("val", "test") and any((path / s).is_dir() for s in ("train", "val", "test")):
        other = "test" if split == "val" else "val"
        if (path / other).is_dir():
            return path / other
        raise FileNotFoundError(f"no {split!r} split in ImageFolder {path} (has no {split}/ or {other}/ subfolder)")
    if split != "train" and (path / "train").is_dir():
        raise FileNotFoundError(f"no {split!r} split in ImageFolder {path}")
    return path


def _torchvision_dataset(kind: str, split: str, root: Path, download: bool):
    import torchvision

    root = Path(root)
    try:
        if kind == "cifar10":
            if split not in ("train", "test"):
                raise ValueError(f"split for 'cifar10' must be 'train' or 'test', got {split!r}")
            train = split == "train"
            return torchvision.datasets.CIFAR10(str(root), train=train, download=download)
        splits = ("unlabeled", "train", "test", "train+unlabeled")
        if split not in splits:
            raise ValueError(f"split for 'stl10' must be one of {splits}, got {split!r}")
        return torchvision.datasets.STL10(str(root), split=split, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted..."
        if not download and "not found" in str(err).lower():
            raise _missing("CIFAR-10" if kind == "cifar10" else "STL-10", root) from None
        raise


_CACHE_MAX_BYTES = 512 * 2**20  # small ImageFolders (like cifar10-small) stay decoded in memory
_IMAGEFOLDER_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor, list[str]]] = {}
_IMAGEFOLDER_SKIPPED: dict[tuple, tuple[list[tuple[str, str]], int] | None] = {}  # what each cached load skipped


_IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _scan_imagefolder(path: Path) -> tuple[list[str], list[int], list[str]]:
    """Files, targets and classes in torchvision ``ImageFolder`` order (without importing torchvision)."""
    classes = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folders in {path} (expected the ImageFolder layout {path}/<class>/<image>)")
    samples, targets = [], []
    for index, name in enumerate(classes):
        for root, _, fnames in sorted(os.walk(path / name, followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(_IMG_EXTENSIONS):
                    samples.append(os.path.join(root, fname))
                    targets.append(index)
    if not samples:
        raise FileNotFoundError(f"no images ({', '.join(_IMG_EXTENSIONS)}) in the class folders of {path}")
    return samples, targets, classes


def _decode_image(file: str) -> torch.Tensor:
    """One image file as a uint8 (3, H, W) tensor; raises what PIL raises for a broken file."""
    from PIL import Image

    with Image.open(file) as pil:
        return torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1)  # (3, H, W) uint8


def _decode_failure(file: str, err: Exception) -> str:
    """Why ``file`` could not be decoded, in a few words."""
    if os.path.isfile(file) and os.path.getsize(file) == 0:
        return "empty file"
    if type(err).__name__ == "UnidentifiedImageError":
        return "not an image format PIL can read"
    return str(err).strip() or type(err).__name__


def _warn_skipped(path: Path, skipped: list[tuple[str, str]], total: int) -> None:
    import warnings

    shown = "; ".join(f"{file} ({reason})" for file, reason in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    warnings.warn(f"skipped {len(skipped)} of {total} image files in {path} that cannot be decoded "
                  f"(empty, corrupt or truncated): {shown}{more}", UserWarning, stacklevel=4)


def _load_imagefolder(path: Path, image_size: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode every image of an ImageFolder into one uint8 tensor (cached in memory by path).

    A file that cannot be decoded (empty, not an image, truncated) is skipped with a warning that
    names it and counts the skipped files; if no file can be decoded, a ``ValueError`` names one.
    """
    key = (str(path.resolve()), image_size)
    if key in _IMAGEFOLDER_CACHE:  # a copy, so that callers may modify what they get
        images, labels, classes = _IMAGEFOLDER_CACHE[key]
        skipped = _IMAGEFOLDER_SKIPPED.get(key)
        if skipped:
            _warn_skipped(path, *skipped)
        return images.clone(), labels.clone(), list(classes)

    samples, targets, classes = _scan_imagefolder(path)
    images, kept, skipped = [], [], []
    for file, target in zip(samples, targets):
        try:
            img = _decode_image(file)
        except Exception as err:  # PIL: UnidentifiedImageError, "image file is truncated", SyntaxError, ...
            skipped.append((file, _decode_failure(file, err)))
            continue
        if image_size is not None and tuple(img.shape[1:]) != (image_size, image_size):
            img = _resize_center_crop(img, image_size)
        images.append(img)
        kept.append(target)
    if not images:
        file, reason = skipped[0]
        raise ValueError(f"none of the {len(samples)} image files in {path} can be decoded, e.g. {file} ({reason})")
    if skipped:
        _warn_skipped(path, skipped, len(samples))
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) > 1:
        raise ValueError(f"images in {path} have different sizes {sorted(sizes)[:3]}...; pass image_size=")
    out = (torch.stack(images), torch.tensor(kept, dtype=torch.long), classes)
    if out[0].numel() <= _CACHE_MAX_BYTES:
        _IMAGEFOLDER_CACHE[key] = (out[0].clone(), out[1].clone(), list(classes))
        _IMAGEFOLDER_SKIPPED[key] = (skipped, len(samples)) if skipped else None
    return out


def _resize_center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the short side to size (antialiased) and centre-crop. (3, H, W) uint8 -> (3, S, S)."""
    h, w = img.shape[-2:]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    x = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8)


def balanced_subset(labels: torch.Tensor, limit: int, seed: int = 0) -> torch.Tensor:
    """Indices (sorted) of a seeded subset of ``limit`` items with the classes as equal as possible.

    Each class is shuffled (one ``randperm`` per class, in label order, from one generator seeded with
    ``seed``); items are then taken round-robin by their rank in their class, so a class smaller than
    its share is taken whole and the others share the rest to within one item. For ``limit = n·L``
    with every class holding n or more items this is n random items of every class. Any label,
    -1 (unlabeled) included, is a class of its own.

    Shape:
        labels: (N,) -> (min(limit, N),) indices.

    Raises:
        ValueError: ``limit`` not an integer >= 0.
    """
    limit = nonneg_int(limit, "limit")
    labels = torch.as_tensor(labels).cpu()
    g = torch.Generator().manual_seed(seed)
    members, ranks = [], []
    for c in labels.unique():  # classes in increasing label order
        idx = torch.nonzero(labels == c).flatten()  # (n_c,)
        members.append(idx[torch.randperm(idx.numel(), generator=g)])
        ranks.append(torch.arange(idx.numel()))
    if not members:
        return torch.empty(0, dtype=torch.long)
    tie = torch.randperm(len(members), generator=g)  # which class goes first within a rank
    cls = torch.cat([torch.full((len(m),), int(t)) for m, t in zip(members, tie)])
    order = torch.argsort(torch.cat(ranks) * len(members) + cls, stable=True)[:limit]
    return torch.cat(members)[order].sort().values


def load_images(
    name: str = "shapes",
    split: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = False,
    limit: int | None = None,
    seed: int = 0,
    image_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Load a whole dataset split as one uint8 tensor (the fast path for small datasets).

    Args:
        name: "shapes" (generated, no download; "shapes-color", "shapes-outline" and "shapes-lab" for its
            colour, outline and Lab-colour variants), "cifar10", "stl10",
            "cifar10-small" (the offline ImageFolder subset of CIFAR-10),
            "imagefolder:PATH" or the path of an existing ImageFolder directory.
        split: "train" or "test"; for stl10 also "unlabeled" and "train+unlabeled";
            for an ImageFolder the subfolder train/val/test if there is one.
        root: download directory of cifar10/stl10; default ``$MOCOLAB_DATA`` or ``<repo>/data``.
        download: download cifar10/stl10 into root if missing.
        limit: for "shapes" the number of images (default 5000 train / 1000 test);
            otherwise a class-balanced seeded random subset of this size.
        seed: for "shapes" the generation seed, otherwise the seed of the subset.
        image_size: output side length; images are resized (short side) and centre-cropped.
            For "shapes" the rendering size (default 32).

    Returns:
        images uint8 (N, 3, H, W), labels long (N,) (-1 for unlabeled), class names.

    Raises:
        ValueError: unknown name (the message lists the choices) or split, bad limit.
        FileNotFoundError: data missing and download=False (the message names the path and
            the download flag), or an ImageFolder path that does not exist.
    """
    if limit is not None:
        limit = nonneg_int(limit, "limit (None for all)")
    kind, path = _resolve_name(name)
    if kind == "shapes":
        choice(split, "split for 'shapes'", SHAPES_SPLITS)
        n = SHAPES_DEFAULT_SIZE[split] if limit is None else limit
        images, labels = make_shapes(n, image_size=image_size or 32, seed=seed, split=split, style=_shapes_style(name))
        return images, labels, list(SHAPE_NAMES[:10])
    if kind == "imagefolder":
        images, labels, classes = _load_imagefolder(_imagefolder_dir(path, split), image_size)
    else:
        ds = _torchvision_dataset(kind, split, Path(root) if root is not None else default_data_root(), download)
        data = torch.from_numpy(np.asarray(ds.data))
        images = data.permute(0, 3, 1, 2) if kind == "cifar10" else data  # stl10 is stored (N, 3, H, W)
        labels = torch.as_tensor(np.asarray(ds.targets if kind == "cifar10" else ds.labels), dtype=torch.long)
        classes = list(ds.classes)
        if image_size is not None and images.shape[-1] != image_size:
            images = torch.stack([_resize_center_crop(im, image_size) for im in images])
    if limit is not None and limit < len(labels):
        idx = balanced_subset(labels, limit, seed)
        images, labels = images[idx], labels[idx]
    return images.contiguous(), labels, classes

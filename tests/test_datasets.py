"""Tests for mocolab.datasets: load_images (shapes, CIFAR-10, STL-10, ImageFolders) and balanced_subset."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mocolab.datasets import balanced_subset, load_images, shared_cifar10_small
from mocolab.evaluate import per_class_subset
from mocolab.shapes import SHAPE_NAMES

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_load_images_shapes_defaults_and_limit():
    x, y, classes = load_images("shapes", split="test")
    assert x.shape == (1000, 3, 32, 32) and y.shape == (1000,)
    assert classes == list(SHAPE_NAMES[:10])
    x2, y2, _ = load_images("shapes", split="test", limit=100, seed=0)
    assert torch.equal(x2, x[:100]) and torch.equal(y2, y[:100])
    x3, _, _ = load_images("shapes", limit=8, image_size=40)
    assert x3.shape == (8, 3, 40, 40)


def test_load_images_unknown_name_lists_choices():
    with pytest.raises(ValueError) as err:
        load_images("mnist")
    msg = str(err.value)
    for choice in ("shapes", "shapes-color", "shapes-outline", "cifar10", "stl10", "cifar10-small",
                   "imagefolder:PATH"):
        assert choice in msg


def test_load_images_bad_limit():
    with pytest.raises(ValueError, match="limit"):
        load_images("shapes", limit=-3)


@pytest.mark.parametrize("name", ["cifar10", "stl10"])
def test_missing_download_names_path_and_flag(tmp_path, name):
    split = "train"
    with pytest.raises(FileNotFoundError) as err:
        load_images(name, split=split, root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "download=True" in msg and "--download" in msg


def test_bad_split_for_real_dataset(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_images("cifar10", split="val", root=tmp_path)


def test_missing_imagefolder_path(tmp_path):
    missing = tmp_path / "nope"
    for name in (f"imagefolder:{missing}", str(missing)):
        with pytest.raises(FileNotFoundError, match="nope"):
            load_images(name)


def _write_folder(root, sizes):
    for split in ("train", "val"):
        for c, color in (("apple", (255, 0, 0)), ("berry", (0, 0, 255))):
            (root / split / c).mkdir(parents=True)
            for i, size in enumerate(sizes):
                Image.new("RGB", size, color).save(root / split / c / f"{i}.png")


def test_imagefolder_with_splits_and_resize(tmp_path):
    _write_folder(tmp_path, [(20, 20), (20, 20), (20, 20)])
    x, y, classes = load_images(f"imagefolder:{tmp_path}", split="val")
    assert x.shape == (6, 3, 20, 20) and classes == ["apple", "berry"]
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    assert x[0, 0].eq(255).all() and x[-1, 2].eq(255).all()
    # "test" falls back to val/ when there is no test/ folder; a plain path works too
    xt, _, _ = load_images(str(tmp_path), split="test", image_size=8)
    assert xt.shape == (6, 3, 8, 8)


def test_imagefolder_mixed_sizes_need_image_size(tmp_path):
    _write_folder(tmp_path, [(20, 20), (30, 24)])
    with pytest.raises(ValueError, match="image_size"):
        load_images(str(tmp_path / "train"))
    x, _, _ = load_images(str(tmp_path / "train"), image_size=16)
    assert x.shape == (4, 3, 16, 16)


def test_broken_images_are_skipped_with_a_warning_that_names_and_counts_them(tmp_path):
    _write_folder(tmp_path, [(20, 20), (20, 20)])
    train = tmp_path / "train"
    good = (train / "apple" / "0.png").read_bytes()
    (train / "apple" / "empty.png").write_bytes(b"")
    (train / "berry" / "garbage.jpg").write_bytes(b"this is not an image")
    (train / "berry" / "truncated.png").write_bytes(good[: len(good) // 2])
    for _ in range(2):  # the second load comes from the in-memory cache, and warns again
        with pytest.warns(UserWarning, match=r"skipped 3 of 7 image files") as rec:
            x, y, classes = load_images(str(train))
        msg = str(rec[0].message)
        assert all(name in msg for name in ("empty.png (empty file)", "garbage.jpg (not an image", "truncated.png"))
        assert x.shape == (4, 3, 20, 20) and y.tolist() == [0, 0, 1, 1] and classes == ["apple", "berry"]


def test_an_imagefolder_of_only_broken_images_is_one_clear_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"")
    (tmp_path / "a" / "y.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match=r"none of the 2 image files in .* can be decoded, e.g. .*x.jpg "
                                         r"\(empty file\)"):
        load_images(str(tmp_path))


CIFAR_SMALL = shared_cifar10_small()
needs_cifar_small = pytest.mark.skipif(
    CIFAR_SMALL is None, reason="../shared/data/cifar10-small (or $MOCOLAB_CIFAR10_SMALL) is absent"
)


@needs_cifar_small
def test_cifar10_small_loads_in_cifar_order():
    x, y, classes = load_images("cifar10-small")
    assert x.shape == (5000, 3, 32, 32) and x.dtype == torch.uint8
    assert classes == CIFAR10_CLASSES
    assert torch.bincount(y).tolist() == [500] * 10
    xt, yt, _ = load_images("cifar10-small", split="test")
    assert xt.shape == (1000, 3, 32, 32) and torch.bincount(yt).tolist() == [100] * 10


@needs_cifar_small
def test_cifar10_small_limit_is_balanced_and_seeded():
    x1, y1, _ = load_images("cifar10-small", split="test", limit=55, seed=1)
    x2, y2, _ = load_images("cifar10-small", split="test", limit=55, seed=1)
    x3, _, _ = load_images("cifar10-small", split="test", limit=55, seed=2)
    assert len(y1) == 55 and torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    counts = torch.bincount(y1, minlength=10)
    assert int(counts.max() - counts.min()) <= 1


def testbalanced_subset_oracle():
    labels = torch.tensor([0] * 50 + [1] * 5 + [2] * 30 + [-1] * 15)
    idx = balanced_subset(labels, 31, seed=0)
    assert len(idx) == 31 and len(set(idx.tolist())) == 31 and torch.equal(idx, idx.sort().values)
    counts = {c: int((labels[idx] == c).sum()) for c in (-1, 0, 1, 2)}
    assert counts[1] == 5 and sum(counts.values()) == 31  # the small class is taken whole
    assert max(counts[c] for c in (-1, 0, 2)) - min(counts[c] for c in (-1, 0, 2)) <= 1
    assert torch.equal(idx, balanced_subset(labels, 31, seed=0))
    unlabeled = balanced_subset(torch.full((20,), -1), 7, seed=1)
    assert len(unlabeled) == 7


def test_balanced_subset_takes_every_class_per_class_times():
    """For n·L items with every class of n or more it is n random items of each class: what
    per_class_subset (label-efficiency curves) draws, the same draws as one randperm per class."""
    g = torch.Generator().manual_seed(3)
    labels = torch.cat([torch.arange(4).repeat(6), torch.randint(0, 4, (40,), generator=g)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    for n, seed in ((1, 0), (3, 5), (6, 2)):
        idx = balanced_subset(labels, 4 * n, seed)
        assert torch.bincount(labels[idx], minlength=4).tolist() == [n] * 4
        assert torch.equal(idx, per_class_subset(labels, n, seed=seed))
        gen = torch.Generator().manual_seed(seed)  # oracle: class by class, a random n of each
        oracle = [torch.nonzero(labels == c).flatten() for c in range(4)]
        oracle = torch.cat([i[torch.randperm(len(i), generator=gen)[:n]] for i in oracle]).sort().values
        assert torch.equal(idx, oracle)
    assert balanced_subset(labels, 0).numel() == 0 and balanced_subset(torch.empty(0, dtype=torch.long), 3).numel() == 0
    assert torch.equal(balanced_subset(labels, 1000), torch.arange(len(labels)))
    with pytest.raises(ValueError, match="limit must be an integer >= 0"):
        balanced_subset(labels, -1)

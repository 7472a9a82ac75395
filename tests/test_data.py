"""Tests for mocolab.data: the shapes dataset, loaders, transforms and BatchAugment."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from mocolab.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    SHAPE_NAMES,
    BatchAugment,
    ShapesDataset,
    TwoCropsTransform,
    describe_augmentation,
    get_dataset,
    load_images,
    make_shapes,
    moco_v1_transform,
    moco_v2_transform,
    normalization_stats,
    normalize,
    shared_cifar10_small,
)
from mocolab.syncs import count_host_syncs

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _identity_augment(**kwargs) -> BatchAugment:
    """A BatchAugment that only resamples the whole image (no crop, flip, colour or blur)."""
    args = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), p_flip=0.0, p_jitter=0.0, p_gray=0.0, p_blur=0.0)
    args.update(kwargs)
    return BatchAugment(**args)


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------


def test_shapes_dtype_shape_and_range():
    x, y = make_shapes(40)
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.uint8
    assert y.shape == (40,) and y.dtype == torch.long
    assert 0 <= int(y.min()) and int(y.max()) < 10
    x48, _ = make_shapes(5, image_size=48)
    assert x48.shape == (5, 3, 48, 48)
    x0, y0 = make_shapes(0)
    assert x0.shape == (0, 3, 32, 32) and y0.shape == (0,)


def test_shapes_deterministic_and_prefix_stable():
    # num_classes=2 generates in chunks of 200 images, so 250 images span two chunks
    x1, y1 = make_shapes(250, num_classes=2, seed=3)
    x2, y2 = make_shapes(250, num_classes=2, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    xp, yp = make_shapes(57, num_classes=2, seed=3)
    assert torch.equal(xp, x1[:57]) and torch.equal(yp, y1[:57])
    x3, _ = make_shapes(50, num_classes=2, seed=4)
    assert not torch.equal(x3, x1[:50])


def test_shapes_train_and_test_differ():
    xtr, _ = make_shapes(200, split="train")
    xte, _ = make_shapes(200, split="test")
    # no test image equals any train image
    assert not {x.numpy().tobytes() for x in xtr} & {x.numpy().tobytes() for x in xte}


def test_shapes_class_balance():
    _, y = make_shapes(1000)
    assert torch.bincount(y, minlength=10).tolist() == [100] * 10
    for n in (7, 95, 333):  # every prefix is balanced to within one image per class
        counts = torch.bincount(make_shapes(n)[1], minlength=10)
        assert int(counts.max() - counts.min()) <= 1


def test_shapes_all_classes_render_a_visible_object():
    x, y = make_shapes(240, num_classes=12, image_size=32)
    assert set(y.tolist()) == set(range(12))
    # the object differs from the background: every image has a wide range of grey levels
    grey = x.float().mean(1).flatten(1)
    spread = grey.quantile(0.98, dim=1) - grey.quantile(0.02, dim=1)
    assert (spread > 30).all()


def test_shapes_same_scenes_at_any_size():
    small, y_small = make_shapes(30, image_size=32)
    big, y_big = make_shapes(30, image_size=64)
    assert torch.equal(y_small, y_big)
    down = torch.nn.functional.avg_pool2d(big.float(), 2)
    assert (down - small.float()).abs().mean() < 12  # same scene, up to anti-aliasing and noise


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=-1), "n must be"),
        (dict(n=10, num_classes=1), "num_classes"),
        (dict(n=10, num_classes=len(SHAPE_NAMES) + 1), "num_classes"),
        (dict(n=10, image_size=4), "image_size"),
        (dict(n=10, split="val"), "split"),
        (dict(n=10, style="sepia"), "style"),
    ],
)
def test_shapes_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_shapes(**kwargs)


def test_shapes_styles():
    gray, y_gray = make_shapes(50)
    color, y_color = make_shapes(50, style="color")
    assert torch.equal(y_gray, y_color) and not torch.equal(gray, color)
    # "gray" draws grey levels only (noise aside); "color" draws saturated hues
    chroma = lambda x: (x.float().amax(1) - x.float().amin(1)).mean().item()  # noqa: E731
    assert chroma(gray) < 6 < 15 < chroma(color)
    xc, yc, classes = load_images("shapes-color", split="test", limit=20)
    assert torch.equal(xc, make_shapes(20, split="test", style="color")[0]) and len(classes) == 10
    ds = get_dataset("shapes-color", split="test")
    assert torch.equal(ds.images[:20], xc)


def test_shapes_outline_is_a_second_domain_of_the_same_scenes():
    filled, y_filled = make_shapes(50)
    outline, y_outline = make_shapes(50, style="outline")
    assert torch.equal(y_filled, y_outline) and not torch.equal(filled, outline)
    xo, yo, classes = load_images("shapes-outline", split="test", limit=20)
    assert torch.equal(xo, make_shapes(20, split="test", style="outline")[0]) and classes == list(SHAPE_NAMES[:10])
    assert torch.equal(get_dataset("shapes-outline", split="test").images[:20], xo)
    assert torch.equal(load_images("shapes-outline", limit=30)[0], outline[:30])  # prefix-stable


def test_shapes_outline_draws_a_stroke_inside_the_filled_shape():
    from mocolab.data import SHAPES_STYLES, _render_shapes_chunk

    # a plain scene (no texture, clutter or noise), so the object is every pixel that is not background
    plain = dict(SHAPES_STYLES["outline"], texture=(0.0, 0.0), noise=0.0, p_clutter=0.0)
    labels = torch.arange(10).repeat(3)
    args = dict(labels=labels, names=SHAPE_NAMES[:10], size=64, seed=5, n_draw=30)
    filled = _render_shapes_chunk(style={**plain, "outline": 0.0}, **args).float().mean(1)  # (N, S, S)
    stroke = _render_shapes_chunk(style=plain, **args).float().mean(1)
    background = filled[:, :1, :1]  # the corners are background (shapes are centred, radius < 0.8)
    in_filled = (filled - background).abs() > 20  # (N, S, S)
    in_stroke = (stroke - background).abs() > 20
    assert in_stroke.flatten(1).any(1).all()  # every outline is visible
    area_filled, area_stroke = in_filled.flatten(1).sum(1), in_stroke.flatten(1).sum(1)
    compact = (labels == SHAPE_NAMES.index("circle")) | (labels == SHAPE_NAMES.index("square"))
    assert (area_stroke[compact] < 0.8 * area_filled[compact]).all()  # the middle of a disc or square is empty
    # the stroke runs along the boundary, half inside the solid shape and half outside
    inside = (in_stroke & in_filled).flatten(1).sum(1) / area_stroke
    assert ((inside > 0.35) & (inside < 0.7)).all(), inside


def test_shapes_lab_shows_the_object_in_both_l_and_ab():
    from mocolab.data import SHAPES_STYLES, _render_shapes_chunk
    from mocolab.multiview import rgb_to_lab

    plain = dict(SHAPES_STYLES["lab"], texture=(0.0, 0.0), noise=0.0, p_clutter=0.0)
    labels = torch.arange(10).repeat(5)
    x = _render_shapes_chunk(labels, SHAPE_NAMES[:10], 32, seed=7, n_draw=50, style=plain)  # (N, 3, S, S)
    lab = rgb_to_lab(x.float() / 255)  # (N, 3, S, S)
    background = lab[:, :, :1, :1]  # the corners are background
    diff = lab - background
    obj = diff.norm(dim=1) > 5  # (N, S, S), the object's pixels
    assert obj.flatten(1).float().mean(1).min() > 0.05
    l_gap = (diff[:, 0].abs() * obj).flatten(1).sum(1) / obj.flatten(1).sum(1)  # mean |ΔL| on the object
    ab_gap = (diff[:, 1:].norm(dim=1) * obj).flatten(1).sum(1) / obj.flatten(1).sum(1)  # mean |Δab|
    # both views see every object (L less for some hues: Lab's L is not the RGB mean the scenes draw)
    assert l_gap.min() > 4 and l_gap.median() > 15 and ab_gap.min() > 20, (l_gap, ab_gap)
    xl, _, _ = load_images("shapes-lab", split="test", limit=20)
    assert torch.equal(xl, make_shapes(20, split="test", style="lab")[0])


def test_shapes_dataset_returns_pil_and_label():
    ds = ShapesDataset(n=20, split="test")
    img, label = ds[3]
    assert isinstance(img, Image.Image) and img.size == (32, 32)
    assert isinstance(label, int) and ds.classes == list(SHAPE_NAMES[:10])
    ds2 = ShapesDataset(n=4, transform=TwoCropsTransform(moco_v2_transform(32)))
    (q, k), _ = ds2[0]
    assert q.shape == k.shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------------
# load_images / get_dataset
# ---------------------------------------------------------------------------------------------


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
    with pytest.raises(FileNotFoundError, match="download=True"):
        get_dataset(name, split=split, root=tmp_path)


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
    ds = get_dataset(str(tmp_path), split="train")
    assert len(ds) == 6 and ds.classes == ["apple", "berry"]


def test_imagefolder_mixed_sizes_need_image_size(tmp_path):
    _write_folder(tmp_path, [(20, 20), (30, 24)])
    with pytest.raises(ValueError, match="image_size"):
        load_images(str(tmp_path / "train"))
    x, _, _ = load_images(str(tmp_path / "train"), image_size=16)
    assert x.shape == (4, 3, 16, 16)


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


@needs_cifar_small
def test_cifar10_small_get_dataset_is_imagefolder():
    ds = get_dataset("cifar10-small", split="test", transform=TwoCropsTransform(moco_v1_transform(32)))
    assert len(ds) == 1000 and ds.classes == CIFAR10_CLASSES
    (q, k), label = ds[0]
    assert q.shape == (3, 32, 32) and label == 0


# ---------------------------------------------------------------------------------------------
# normalisation and torchvision transforms
# ---------------------------------------------------------------------------------------------


def test_normalize_matches_manual():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    out = normalize(x)
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std)
    assert normalization_stats(224)[0] == IMAGENET_MEAN
    with pytest.raises(ValueError, match="3, H, W"):
        normalize(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


def test_two_crops_gives_two_different_views():
    img = Image.fromarray(make_shapes(1)[0][0].permute(1, 2, 0).numpy())
    torch.manual_seed(0)
    for base in (moco_v1_transform(32), moco_v2_transform(32)):
        q, k = TwoCropsTransform(base)(img)
        assert q.shape == k.shape == (3, 32, 32)
        assert not torch.equal(q, k)
    with pytest.raises(ValueError, match="callable"):
        TwoCropsTransform(3)


def test_moco_transform_recipes():
    names = lambda t: [type(op).__name__ for op in t.transforms]  # noqa: E731
    v1 = names(moco_v1_transform(224))
    recipe = ["RandomResizedCrop", "RandomGrayscale", "ColorJitter", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert v1 == recipe
    v2_small, v2_large = moco_v2_transform(32), moco_v2_transform(224)
    assert "RandomApply" in names(v2_small) and len(v2_large.transforms) == len(v2_small.transforms) + 1
    blur = v2_large.transforms[3]
    assert type(blur.transforms[0]).__name__ == "GaussianBlur" and blur.p == 0.5
    assert v2_large.transforms[0].scale == (0.2, 1.0)
    assert list(v2_large.transforms[-1].mean) == list(IMAGENET_MEAN)


# ---------------------------------------------------------------------------------------------
# BatchAugment
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["v1", "v2"])
def test_batch_augment_shape_dtype_range(preset):
    x, _ = make_shapes(16)
    aug = BatchAugment(24, preset=preset)
    out = aug(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 24, 24) and out.dtype == torch.float32
    pixels = aug.denormalize(out)
    assert pixels.min() >= 0 and pixels.max() <= 1
    # in normalised units the values stay within what [0, 1] pixels allow
    lo = (0 - aug.mean) / aug.std
    hi = (1 - aug.mean) / aug.std
    assert (out >= lo - 1e-5).all() and (out <= hi + 1e-5).all()


def test_batch_augment_deterministic_with_generator():
    x, _ = make_shapes(8)
    aug = BatchAugment(32, preset="v2", random_order=True)
    a = aug(x, generator=torch.Generator().manual_seed(5))
    b = aug(x, generator=torch.Generator().manual_seed(5))
    c = aug(x, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    two = aug(torch.cat([x[:1], x[:1]]))  # two views of one image differ
    assert not torch.equal(two[0], two[1])


def test_batch_augment_identity_equals_normalized_input():
    x, _ = make_shapes(6)
    torch.testing.assert_close(_identity_augment()(x), normalize(x), atol=1e-5, rtol=0)
    flipped = _identity_augment(p_flip=1.0)(x)
    torch.testing.assert_close(flipped, normalize(x.flip(-1)), atol=1e-5, rtol=0)
    # float input in [0, 1] is accepted as well
    torch.testing.assert_close(_identity_augment()(x.float() / 255), normalize(x), atol=1e-5, rtol=0)


def test_batch_augment_crop_matches_slicing():
    x = torch.rand(3, 3, 64, 64)
    aug = BatchAugment(32)
    box = torch.tensor([[8.0, 4.0, 32.0, 32.0], [0.0, 0.0, 32.0, 32.0], [32.0, 32.0, 32.0, 32.0]])
    out = aug._crop_flip(x, box, torch.tensor([False, True, False]))
    torch.testing.assert_close(out[0], x[0, :, 4:36, 8:40])
    torch.testing.assert_close(out[1], x[1, :, 0:32, 0:32].flip(-1))
    torch.testing.assert_close(out[2], x[2, :, 32:, 32:])


def test_batch_augment_crop_boxes_follow_torchvision_sampling():
    aug = BatchAugment(32, scale=(0.2, 1.0))
    p = aug.sample_params(4000, 32, 32, generator=torch.Generator().manual_seed(0))
    x0, y0, w, h = p["box"].unbind(1)
    area = w * h / (32 * 32)
    assert area.min() >= 0.2 - 1e-5 and area.max() <= 1 + 1e-5
    assert (w / h).min() >= 3 / 4 - 1e-4 and (w / h).max() <= 4 / 3 + 1e-4
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 32 + 1e-4).all() and (y0 + h <= 32 + 1e-4).all()
    assert abs(p["flip"].float().mean() - 0.5) < 0.05
    assert abs(p["jitter"].float().mean() - 0.8) < 0.05 and abs(p["gray"].float().mean() - 0.2) < 0.05
    # a crop scale that never fits the aspect ratio falls back to a centre crop, as torchvision
    wide = BatchAugment(16, scale=(1.0, 1.0), ratio=(2.0, 2.0)).sample_params(5, 32, 32)
    torch.testing.assert_close(wide["box"][0], torch.tensor([0.0, 8.0, 32.0, 16.0]))


@pytest.mark.parametrize("op, name", [(0, "brightness"), (1, "contrast"), (2, "saturation"), (3, "hue")])
def test_color_jitter_ops_match_torchvision(op, name):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 10, 10, generator=g)
    x[0, :, :3] = 0.5  # some grey pixels
    factors = torch.tensor([0.6, 1.0, 1.4, 0.0, 0.9, 1.3]) if op < 3 else torch.tensor([-0.5, -0.2, 0.0, 0.1, 0.3, 0.5])
    fn = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation, 3: TF.adjust_hue}[op]
    ref = torch.stack([fn(x[i], float(factors[i])) for i in range(6)])
    out = BatchAugment._jitter_op(x, op, {name: factors})
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=0)


def test_grayscale_and_blur():
    x, _ = make_shapes(4)
    gray = _identity_augment(p_gray=1.0)
    out = gray.denormalize(gray(x))
    torch.testing.assert_close(out[:, 0], out[:, 1])
    torch.testing.assert_close(out[:, 1], out[:, 2])
    # blur with a fixed sigma equals torchvision's gaussian_blur with the same kernel
    aug = BatchAugment(32, sigma=(1.5, 1.5), p_blur=1.0)
    xf = x.float() / 255
    ref = TF.gaussian_blur(xf, [13, 13], [1.5, 1.5])
    torch.testing.assert_close(aug._blur(xf, torch.full((4,), 1.5)), ref, atol=5e-4, rtol=0)
    assert torch.equal(aug._blur(xf, torch.zeros(4)), xf)  # sigma 0 means no blur


def test_presets():
    v1, v2 = BatchAugment(32, preset="v1"), BatchAugment(32, preset="v2")
    assert v1.jitter == (0.4, 0.4, 0.4, 0.4) and v1.p_jitter == 1.0 and v1.gray_first
    assert v2.jitter == (0.4, 0.4, 0.4, 0.1) and v2.p_jitter == 0.8 and not v2.gray_first
    assert v2.p_blur == 0.0 and BatchAugment(96, preset="v2").p_blur == 0.5 and v1.p_gray == v2.p_gray == 0.2
    assert BatchAugment(224).mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)


def test_return_params_and_description():
    x, _ = make_shapes(5)
    aug = BatchAugment(64, preset="v2")
    out, p = aug(x, generator=torch.Generator().manual_seed(1), return_params=True)
    assert out.shape == (5, 3, 64, 64)
    assert set(p) >= {"box", "flip", "jitter", "brightness", "contrast", "saturation", "hue", "gray", "sigma"}
    assert all(len(v) == 5 for v in p.values())
    assert ((p["sigma"] == 0) | ((p["sigma"] >= 0.1) & (p["sigma"] <= 2.0))).all()
    no_jitter = ~p["jitter"]
    assert (p["brightness"][no_jitter] == 1).all() and (p["hue"][no_jitter] == 0).all()
    text = describe_augmentation(p, 0)
    assert text.startswith("crop ") and "\n" in text


def test_channels_last_output():
    x, _ = make_shapes(2)
    out = BatchAugment(32, channels_last=True)(x)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kwargs", [dict(preset="v2"), dict(preset="v1", random_order=True),
                                    dict(image_size=64, p_blur=0.5)])
def test_batch_augment_makes_no_host_sync(kwargs):
    # no .any() early-outs and no tensors made from Python lists: a call never waits for the device
    x, _ = make_shapes(8)
    aug = BatchAugment(**kwargs)
    with count_host_syncs(strict=True):
        aug(x)
        aug(x, generator=torch.Generator().manual_seed(0))
    assert not set(aug.state_dict())  # the constants are buffers, but not saved


def test_batch_augment_params_drawn_on_another_device_keep_their_dtypes():
    aug = BatchAugment(32, random_order=True)
    here = aug.sample_params(5, 32, 32, generator=torch.Generator().manual_seed(0))
    moved = aug.sample_params(5, 32, 32, generator=torch.Generator().manual_seed(0), device="meta")  # one packed copy
    assert {k: (v.dtype, v.shape) for k, v in moved.items()} == {k: (v.dtype, v.shape) for k, v in here.items()}
    assert all(v.device.type == "meta" for v in moved.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batch_augment_on_cuda():
    x, _ = make_shapes(8)
    aug = BatchAugment(32).cuda()
    out = aug(x.cuda(), generator=torch.Generator("cuda").manual_seed(0))
    assert out.device.type == "cuda" and out.shape == (8, 3, 32, 32)
    # a CPU generator draws the same parameters, so the views match the CPU ones
    on_gpu = aug(x.cuda(), generator=torch.Generator().manual_seed(1))
    on_cpu = aug.cpu()(x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(preset="v3"), "preset"),
        (dict(scale=(0.0, 1.0)), "scale"),
        (dict(scale=(0.8, 0.5)), "scale"),
        (dict(ratio=(2.0, 1.0)), "ratio"),
        (dict(p_gray=1.5), "p_gray"),
        (dict(p_flip=-0.1), "p_flip"),
        (dict(jitter=(0.4, 0.4, 0.4, 0.7)), "jitter"),
        (dict(sigma=(0.0, 2.0)), "sigma"),
        (dict(image_size=0), "image_size"),
    ],
)
def test_batch_augment_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchAugment(**kwargs)


def test_batch_augment_bad_input():
    with pytest.raises(ValueError, match="N, 3, H, W"):
        BatchAugment(32)(torch.zeros(3, 32, 32, dtype=torch.uint8))


def test_uniform_crop_area_statistics():
    """The crop area fraction is uniform in scale (the torchvision recipe), so its mean is the midpoint."""
    p = BatchAugment(32, scale=(0.2, 1.0), ratio=(1.0, 1.0)).sample_params(
        20000, 32, 32, generator=torch.Generator().manual_seed(0)
    )
    area = p["box"][:, 2] * p["box"][:, 3] / 1024
    assert math.isclose(float(area.mean()), 0.6, abs_tol=0.01)


def test_balanced_subset_oracle():
    from mocolab.data import _balanced_subset

    labels = torch.tensor([0] * 50 + [1] * 5 + [2] * 30 + [-1] * 15)
    idx = _balanced_subset(labels, 31, seed=0)
    assert len(idx) == 31 and len(set(idx.tolist())) == 31 and torch.equal(idx, idx.sort().values)
    counts = {c: int((labels[idx] == c).sum()) for c in (-1, 0, 1, 2)}
    assert counts[1] == 5 and sum(counts.values()) == 31  # the small class is taken whole
    assert max(counts[c] for c in (-1, 0, 2)) - min(counts[c] for c in (-1, 0, 2)) <= 1
    assert torch.equal(idx, _balanced_subset(labels, 31, seed=0))
    unlabeled = _balanced_subset(torch.full((20,), -1), 7, seed=1)
    assert len(unlabeled) == 7


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

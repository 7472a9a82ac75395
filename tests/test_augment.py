"""Tests for mocolab.augment: BatchAugment, normalize / denormalize, describe_augmentation."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from mocolab.augment import BatchAugment, denormalize, describe_augmentation, normalize
from mocolab.datasets import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, normalization_stats
from mocolab.shapes import make_shapes
from mocolab.syncs import count_host_syncs


def _identity_augment(**kwargs) -> BatchAugment:
    """A BatchAugment that only resamples the whole image (no crop, flip, colour or blur)."""
    args = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), p_flip=0.0, p_jitter=0.0, p_gray=0.0, p_blur=0.0)
    args.update(kwargs)
    return BatchAugment(**args)


def test_normalize_matches_manual():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    out = normalize(x)
    mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std)
    assert normalization_stats(224)[0] == IMAGENET_MEAN
    with pytest.raises(ValueError, match="3, H, W"):
        normalize(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


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


def test_denormalize_undoes_normalize():
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(denormalize(normalize(x)), x.float() / 255, atol=1e-6, rtol=0)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    torch.testing.assert_close(denormalize(normalize(x, mean, std), mean, std), x.float() / 255, atol=1e-6, rtol=0)
    aug = BatchAugment(8)
    views = aug(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(aug.denormalize(views), denormalize(views).clamp(0, 1))
    assert denormalize(normalize(x[0])).shape == (3, 8, 8)

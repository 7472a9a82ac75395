"""Tests for mocolab.shapes: the bundled synthetic dataset "shapes"."""

from __future__ import annotations

import pytest
import torch

from mocolab.datasets import load_images
from mocolab.shapes import SHAPE_NAMES, make_shapes


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


def test_shapes_outline_is_a_second_domain_of_the_same_scenes():
    filled, y_filled = make_shapes(50)
    outline, y_outline = make_shapes(50, style="outline")
    assert torch.equal(y_filled, y_outline) and not torch.equal(filled, outline)
    xo, yo, classes = load_images("shapes-outline", split="test", limit=20)
    assert torch.equal(xo, make_shapes(20, split="test", style="outline")[0]) and classes == list(SHAPE_NAMES[:10])
    assert torch.equal(load_images("shapes-outline", limit=30)[0], outline[:30])  # prefix-stable


def test_shapes_outline_draws_a_stroke_inside_the_filled_shape():
    from mocolab.shapes import SHAPES_STYLES, _render_shapes_chunk

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
    from mocolab.multiview import rgb_to_lab
    from mocolab.shapes import SHAPES_STYLES, _render_shapes_chunk

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

"""Datasets and augmentations for contrastive learning.

Three ways to get images:

* :func:`load_images` returns a whole (small) dataset as one uint8 tensor
  ``(N, 3, H, W)`` with labels. This is the fast path used by the notebooks
  and the trainer: augment batches on the device with :class:`BatchAugment`.
* :func:`get_dataset` returns a classic ``torch.utils.data.Dataset`` of PIL
  images (torchvision style) for ImageNet-size ImageFolders, to be used with
  :class:`TwoCropsTransform` and :func:`moco_v1_transform` /
  :func:`moco_v2_transform` in a ``DataLoader``.
* :func:`make_shapes` generates the bundled synthetic dataset "shapes": the
  class is the *shape* of one object; everything else (grey levels, background
  texture, position, size, rotation, clutter) is a nuisance that raw pixels
  cannot see past, but that the MoCo augmentations teach an encoder to ignore.
  Its variant "shapes-color" adds random hues, which the MoCo v2 augmentation
  does not remove well enough for a short run; "shapes-outline" draws the same
  classes as outlines, a second domain for transfer; "shapes-lab" gives the
  object a hue of its own, so that the L and ab channels of Lab both show it (CMC).

Letter legend: N images in a batch, H x W input size, S output size.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SHAPE_NAMES",
    "SHAPES_STYLES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DATASET_NAMES",
    "make_shapes",
    "ShapesDataset",
    "TensorImageDataset",
    "load_images",
    "get_dataset",
    "shared_cifar10_small",
    "default_data_root",
    "normalization_stats",
    "normalize",
    "TwoCropsTransform",
    "moco_v1_transform",
    "moco_v2_transform",
    "BatchAugment",
    "describe_augmentation",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)  # the values of the official MoCo CIFAR-10 demo
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SHAPES_NAMES = ("shapes", "shapes-color", "shapes-outline", "shapes-lab")  # "shapes-STYLE": SHAPES_STYLES[STYLE]
DATASET_NAMES = (*SHAPES_NAMES, "cifar10", "stl10", "cifar10-small")
_CHOICES = ", ".join(f"'{n}'" for n in DATASET_NAMES) + ", 'imagefolder:PATH' or an existing directory"
_REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# The bundled synthetic dataset "shapes"
# ----------------------------------------------------------------------------------------------

SHAPE_NAMES = (
    "circle", "ring", "square", "triangle", "cross", "star",
    "crescent", "ell", "bars", "tee", "frame", "semicircle",
)  # fmt: skip
_SHAPES_DEFAULT_SIZE = {"train": 5000, "test": 1000}
_SHAPES_SPLITS = {"train": 0, "test": 1}
_CHUNK_PER_CLASS = 100  # images are generated in chunks of 100 * num_classes (prefix-stable)


def _length(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(u * u + v * v)


def _sd_box(u, v, bx, by):
    """Signed distance to an axis-aligned box with half sizes (bx, by)."""
    qx, qy = u.abs() - bx, v.abs() - by
    outside = _length(qx.clamp(min=0), qy.clamp(min=0))
    inside = torch.maximum(qx, qy).clamp(max=0)
    return outside + inside


def _sd_triangle(u, v, r=0.82):
    """Signed distance to an equilateral triangle (centroid at the origin, side 2r)."""
    k = math.sqrt(3.0)
    px, py = u.abs() - r, v + r / k
    flip = px + k * py > 0
    px, py = torch.where(flip, (px - k * py) / 2, px), torch.where(flip, (-k * px - py) / 2, py)
    px = px - px.clamp(-2 * r, 0)
    return -_length(px, py) * torch.sign(py)


def _sd_star5(u, v, r=0.95, rf=0.45):
    """Signed distance to a five-pointed star (outer radius r, inner ratio rf)."""
    k1x, k1y = 0.809016994375, -0.587785252292
    k2x, k2y = -k1x, k1y
    px, py = u.abs(), v
    d = (k1x * px + k1y * py).clamp(min=0)
    px, py = px - 2 * d * k1x, py - 2 * d * k1y
    d = (k2x * px + k2y * py).clamp(min=0)
    px, py = px - 2 * d * k2x, py - 2 * d * k2y
    px, py = px.abs(), py - r
    bax, bay = rf * -k1y, rf * k1x - 1.0
    h = ((px * bax + py * bay) / (bax * bax + bay * bay)).clamp(0, r)
    return _length(px - bax * h, py - bay * h) * torch.sign(py * bax - px * bay)


def _shape_sdf(name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) of a unit-sized shape in local coordinates."""
    r = _length(u, v)
    if name == "circle":
        return r - 0.9
    if name == "ring":
        return (r - 0.68).abs() - 0.24
    if name == "square":
        return _sd_box(u, v, 0.72, 0.72)
    if name == "triangle":
        return _sd_triangle(u, v)
    if name == "cross":
        return torch.minimum(_sd_box(u, v, 0.9, 0.28), _sd_box(u, v, 0.28, 0.9))
    if name == "star":
        return _sd_star5(u, v)
    if name == "crescent":
        u = u + 0.2
        return torch.maximum(_length(u, v) - 0.9, -(_length(u - 0.42, v) - 0.72))
    if name == "ell":
        return torch.minimum(_sd_box(u + 0.45, v, 0.27, 0.9), _sd_box(u, v - 0.63, 0.72, 0.27))
    if name == "bars":
        return torch.minimum(_sd_box(u, v - 0.5, 0.9, 0.22), _sd_box(u, v + 0.5, 0.9, 0.22))
    if name == "tee":
        return torch.minimum(_sd_box(u, v + 0.63, 0.9, 0.27), _sd_box(u, v, 0.27, 0.9))
    if name == "frame":
        return torch.maximum(_sd_box(u, v, 0.85, 0.85), -_sd_box(u, v, 0.45, 0.45))
    if name == "semicircle":
        v = v + 0.4
        return torch.maximum(_length(u, v) - 0.95, -v)
    raise ValueError(f"unknown shape {name!r}; choose one of {SHAPE_NAMES}")


def _random_colors(lum: torch.Tensor, u_hue: torch.Tensor, u_chroma: torch.Tensor, max_chroma: float) -> torch.Tensor:
    """RGB colours (..., 3) with mean about lum, a hue and a chroma from uniforms in [0, 1)."""
    hue, chroma = u_hue * 2 * math.pi, u_chroma * max_chroma
    offsets = torch.tensor([0.0, -2 * math.pi / 3, 2 * math.pi / 3])
    rgb = lum[..., None] + chroma[..., None] * torch.cos(hue[..., None] + offsets)  # (..., 3)
    return rgb.clamp(0, 1)


def _hash_noise(xs: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Deterministic white noise with unit variance per image from a key in [0, 1): (N,) -> (N, 3, S, S)."""
    size = xs.shape[0]
    coords = torch.arange(size, dtype=torch.float64)
    iy, ix = torch.meshgrid(coords, coords, indexing="ij")
    ch = torch.arange(3, dtype=torch.float64).view(1, 3, 1, 1)
    k = key.double().view(-1, 1, 1, 1) * 1000.0
    t = torch.sin(ix * 12.9898 + iy * 78.233 + ch * 37.719 + k * 3.917) * 43758.5453
    return ((t - torch.floor(t)).float() - 0.5) * math.sqrt(12.0)


# How strong each nuisance is. "gray" (the default) is tuned so that raw pixels do poorly
# while a few hundred MoCo steps on a CPU learn the shapes. "color" adds random hues, stronger
# textures and more clutter: the MoCo v2 augmentation removes too little colour for a short run
# to ignore it, so colour becomes a shortcut (an experiment for the learner, as in SimCLR).
SHAPES_STYLES = {
    "gray": dict(
        position=0.25,  # centre offset, fraction of the half image
        scale=(0.45, 0.7),  # shape radius, fraction of the half image
        contrast=(0.4, 0.6),  # luminance difference shape vs background
        chroma=0.0,  # maximum colourfulness (0: grey levels only)
        texture=(0.0, 0.05),  # background texture amplitude
        noise=0.01,  # maximum pixel noise std
        p_clutter=0.1,  # probability of each of three clutter lines
    ),
    "color": dict(
        position=0.42, scale=(0.34, 0.6), contrast=(0.22, 0.52), chroma=0.4, texture=(0.06, 0.28),
        noise=0.03, p_clutter=0.5,
    ),  # fmt: skip
    # a second domain with the same classes: each shape drawn as its outline (a stroke of half-width
    # `outline` shape radii) over stronger background textures
    "outline": dict(
        position=0.25, scale=(0.5, 0.75), contrast=(0.45, 0.65), chroma=0.0, texture=(0.05, 0.15), noise=0.01,
        p_clutter=0.1, outline=0.12,
    ),  # fmt: skip
    # colour for CMC: the object differs from the background in grey level *and* in hue (at least
    # `hue_gap` of a turn apart, chroma at least `chroma_min`), drawn independently, so the L and the ab
    # channels of Lab both show the silhouette, each with its own nuisance
    "lab": dict(
        position=0.15, scale=(0.5, 0.7), contrast=(0.4, 0.6), chroma=0.35, chroma_min=0.25, hue_gap=0.3,
        texture=(0.0, 0.03), noise=0.01, p_clutter=0.0,
    ),  # fmt: skip
}
_N_SEG = 3  # clutter lines per image
_NOISE_GRID = 4  # smooth background noise: a 4x4 grid, upsampled


def _sample_scene_params(n_draw: int, n: int, g: torch.Generator, st: dict) -> dict:
    """All random numbers of n scenes (drawn for n_draw >= n scenes, so that prefixes are stable)."""

    def rand(*shape):
        return torch.rand(n_draw, *shape, generator=g)[:n]

    p = {}
    p["cx"], p["cy"] = (rand() * 2 - 1) * st["position"], (rand() * 2 - 1) * st["position"]
    p["scale"] = st["scale"][0] + rand() * (st["scale"][1] - st["scale"][0])  # radius / half image
    p["theta"] = rand() * 2 * math.pi
    p["mirror"] = torch.where(rand() < 0.5, -1.0, 1.0)
    bg_lum = 0.12 + rand() * 0.76
    delta = st["contrast"][0] + rand() * (st["contrast"][1] - st["contrast"][0])
    sign = torch.where(rand() < 0.5, -1.0, 1.0)
    sign = torch.where((bg_lum + sign * delta > 0.97) | (bg_lum + sign * delta < 0.03), -sign, sign)
    fg_lum = (bg_lum + sign * delta).clamp(0.03, 0.97)
    hue_bg, chroma_bg = rand(), rand()
    hue_fg, chroma_fg = rand(), rand()
    if st.get("hue_gap", 0.0) > 0:  # the object's hue differs from the background's by at least hue_gap turns
        hue_fg = (hue_bg + st["hue_gap"] + hue_fg * (1 - 2 * st["hue_gap"])) % 1.0
    low = st.get("chroma_min", 0.0) / st["chroma"] if st["chroma"] > 0 else 0.0  # chroma in [chroma_min, chroma]
    p["bg_rgb"] = _random_colors(bg_lum, hue_bg, low + chroma_bg * (1 - low), st["chroma"])  # (N, 3)
    p["fg_rgb"] = _random_colors(fg_lum, hue_fg, low + chroma_fg * (1 - low), st["chroma"])
    p["shade"] = (rand(2) * 2 - 1) * 0.12  # a linear shading gradient on the shape
    # background texture: kind 0 stripes, 1 checks, 2 ramp, 3 smooth noise
    p["tex_kind"] = (rand() * 4).long().clamp(max=3)
    p["tex_amp"] = st["texture"][0] + rand() * (st["texture"][1] - st["texture"][0])
    tex_dir = rand(3) * 0.6 + 0.4
    p["tex_dir"] = tex_dir / tex_dir.norm(dim=1, keepdim=True) * math.sqrt(3)  # (N, 3)
    p["tex_phi"], p["tex_phase"] = rand() * math.pi, rand() * 2 * math.pi
    p["tex_freq"] = 1.0 + rand() * 5.0  # cycles per image width
    p["tex_grid"] = rand(_NOISE_GRID, _NOISE_GRID) * 2 - 1  # (N, 4, 4)
    # clutter: thin line segments, each shown with probability p_clutter
    p["seg_a"] = (rand(_N_SEG, 2) * 2 - 1) * 0.95
    p["seg_ang"] = rand(_N_SEG) * 2 * math.pi
    p["seg_len"] = 0.15 + rand(_N_SEG) * 0.35
    p["seg_on"] = rand(_N_SEG) < st["p_clutter"]
    p["seg_rgb"] = _random_colors(0.05 + rand(_N_SEG) * 0.9, rand(_N_SEG), rand(_N_SEG), st["chroma"])  # (N, 3seg, 3)
    p["noise_std"], p["noise_key"] = rand() * st["noise"], rand()
    return p


def _background_texture(p: dict, xs: torch.Tensor) -> torch.Tensor:
    """A texture in about [-1, 1] per image: stripes, checks, a ramp or smooth noise. Shape: (N, 1, S, S)."""
    X, Y = xs[None, None, :], xs[None, :, None]  # (1, 1, S), (1, S, 1)
    phi, freq, phase = (p[k][:, None, None] for k in ("tex_phi", "tex_freq", "tex_phase"))
    along = X * torch.cos(phi) + Y * torch.sin(phi)  # (N, S, S)
    across = -X * torch.sin(phi) + Y * torch.cos(phi)
    stripes = torch.sin(math.pi * freq * along + phase)
    checks = torch.sign(stripes * torch.sin(math.pi * freq * across + phase))
    size = xs.shape[0]
    noise = F.interpolate(p["tex_grid"][:, None], size=(size, size), mode="bicubic", align_corners=False)[:, 0]
    kind = p["tex_kind"][:, None, None]
    tex = torch.where(kind == 0, stripes, torch.where(kind == 1, checks, torch.where(kind == 2, along, noise)))
    return tex[:, None]  # (N, 1, S, S)


def _render_shapes_chunk(
    labels: torch.Tensor, names: tuple[str, ...], size: int, seed: int, n_draw: int, style: dict
) -> torch.Tensor:
    """Render the scenes of one chunk for the given labels. Returns uint8 (N, 3, S, S)."""
    g = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    p = _sample_scene_params(n_draw, n, g, style)
    xs = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    pixel = 2.0 / size
    X, Y = xs[None, None, :], xs[None, :, None]

    # -- the shape: signed distance in the shape's local frame
    scale = p["scale"][:, None, None]
    dx, dy = X - p["cx"][:, None, None], Y - p["cy"][:, None, None]  # (N, S, S)
    cos, sin = torch.cos(p["theta"])[:, None, None], torch.sin(p["theta"])[:, None, None]
    u = (dx * cos + dy * sin) / scale * p["mirror"][:, None, None]
    v = (-dx * sin + dy * cos) / scale
    sdf = torch.empty(n, size, size)
    for c, name in enumerate(names):
        idx = (labels == c).nonzero(as_tuple=True)[0]
        if idx.numel():
            sdf[idx] = _shape_sdf(name, u[idx], v[idx])
    if style.get("outline", 0) > 0:
        sdf = sdf.abs() - style["outline"]  # inside a stroke along the shape's boundary
    alpha = (0.5 - sdf * scale / pixel).clamp(0, 1)[:, None]  # (N, 1, S, S), anti-aliased edge

    # -- background: colour, texture, clutter lines
    tex = _background_texture(p, xs)  # (N, 1, S, S)
    img = p["bg_rgb"][:, :, None, None] + p["tex_amp"].view(-1, 1, 1, 1) * tex * p["tex_dir"][:, :, None, None]
    for j in range(_N_SEG):
        if not bool(p["seg_on"][:, j].any()):
            continue
        ax, ay = p["seg_a"][:, j, 0, None, None], p["seg_a"][:, j, 1, None, None]
        length, ang = p["seg_len"][:, j, None, None], p["seg_ang"][:, j, None, None]
        pax, pay = X - ax, Y - ay
        bax, bay = length * torch.cos(ang), length * torch.sin(ang)
        h = ((pax * bax + pay * bay) / (bax * bax + bay * bay)).clamp(0, 1)
        dist = _length(pax - bax * h, pay - bay * h)  # (N, S, S)
        a = ((0.5 - (dist - 0.6 * pixel) / pixel).clamp(0, 1) * p["seg_on"][:, j, None, None])[:, None]
        img = img * (1 - a) + p["seg_rgb"][:, j, :, None, None] * a

    # -- the shape on top, then pixel noise
    shade = p["shade"][:, 0, None, None] * X + p["shade"][:, 1, None, None] * Y  # (N, S, S)
    fg = p["fg_rgb"][:, :, None, None] + shade[:, None]
    img = img * (1 - alpha) + fg * alpha
    if float(p["noise_std"].max()) > 0:
        img = img + p["noise_std"].view(-1, 1, 1, 1) * _hash_noise(xs, p["noise_key"])
    return (img.clamp(0, 1) * 255).round_().to(torch.uint8)


def _mix_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def make_shapes(
    n: int,
    num_classes: int = 10,
    image_size: int = 32,
    seed: int = 0,
    split: str = "train",
    style: str = "gray",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate the synthetic "shapes" dataset.

    Each image shows one object whose *shape* is the class (circle, ring,
    square, triangle, cross, star, crescent, ell, bars, tee, frame,
    semicircle) at a random position, size, rotation and mirror image, in a
    random grey level (light on dark or dark on light) over a background of
    another random grey level with a faint random texture (stripes, checks,
    a ramp or smooth noise), occasional thin clutter lines and pixel noise.
    The shape keeps a luminance contrast with the background, so it survives
    the MoCo augmentations (crops, colour jitter, grayscale), while raw
    pixels are dominated by the nuisances: raw-pixel kNN is only a little
    above chance.

    ``style="color"`` draws random hues for object, background and clutter,
    with stronger textures and more clutter. The MoCo v2 augmentation
    (hue jitter of 0.1 turn) leaves much of the colour in place, so a short
    contrastive run learns colour rather than shape on it: a demonstration of
    why colour distortion matters (Chen et al., SimCLR, 2020).

    ``style="outline"`` draws each shape as its outline (a stroke along the
    boundary) over stronger background textures: the same classes in another
    domain, for transfer. Its scenes (classes, positions, rotations) are
    those of the same seed and split in the other styles.

    Generation is deterministic given (seed, split, style), and prefix-stable:
    ``make_shapes(100)`` equals the first 100 images of ``make_shapes(1000)``.
    Every prefix is class balanced to within one image per class. The
    "train" and "test" splits come from different random streams. Scenes do
    not depend on ``image_size``: a larger size renders the same scenes
    at a higher resolution.

    Args:
        n: number of images (>= 0).
        num_classes: number of shape classes, 2 to 12.
        image_size: side length S in pixels (>= 8).
        seed: random seed.
        split: "train" or "test".
        style: "gray" (default), "color", "outline" or "lab" (a key of :data:`SHAPES_STYLES`).

    Returns:
        images uint8 (N, 3, S, S) and labels long (N,).

    Raises:
        ValueError: for a bad n, num_classes, image_size, split or style.
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if not 2 <= num_classes <= len(SHAPE_NAMES):
        raise ValueError(f"num_classes must be in 2..{len(SHAPE_NAMES)}, got {num_classes}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if split not in _SHAPES_SPLITS:
        raise ValueError(f"split for 'shapes' must be one of {tuple(_SHAPES_SPLITS)}, got {split!r}")
    if style not in SHAPES_STYLES:
        raise ValueError(f"style must be one of {tuple(SHAPES_STYLES)}, got {style!r}")
    names = SHAPE_NAMES[:num_classes]
    chunk = _CHUNK_PER_CLASS * num_classes
    images, labels = [], []
    for i in range(math.ceil(n / chunk)):
        g = torch.Generator().manual_seed(_mix_seed(seed, _SHAPES_SPLITS[split], num_classes, i, 0))
        # consecutive blocks of num_classes images hold every class once: prefixes stay balanced
        y = torch.cat([torch.randperm(num_classes, generator=g) for _ in range(_CHUNK_PER_CLASS)])
        m = min(chunk, n - i * chunk)
        y = y[:m]
        chunk_seed = _mix_seed(seed, _SHAPES_SPLITS[split], num_classes, i, 1)
        images.append(_render_shapes_chunk(y, names, image_size, chunk_seed, n_draw=chunk, style=SHAPES_STYLES[style]))
        labels.append(y)
    if not images:
        return torch.empty(0, 3, image_size, image_size, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return torch.cat(images), torch.cat(labels).long()


class TensorImageDataset(torch.utils.data.Dataset):
    """A dataset over a uint8 image tensor that returns (PIL image or transformed, label).

    Shape: images (N, 3, H, W) uint8, labels (N,).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes=None, transform: Callable | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
        self.images, self.labels = images, torch.as_tensor(labels).long()
        self.classes = list(classes) if classes is not None else sorted(set(self.labels.tolist()))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from PIL import Image

        img = Image.fromarray(self.images[index].permute(1, 2, 0).numpy())
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index])


class ShapesDataset(TensorImageDataset):
    """The "shapes" dataset as a torch Dataset of (PIL image or transformed, label).

    Args:
        n: number of images; default 5000 for "train", 1000 for "test".
        split: "train" or "test".
        num_classes, image_size, seed, style: see :func:`make_shapes`.
        transform: applied to the PIL image (e.g. ``TwoCropsTransform(moco_v2_transform())``).
    """

    def __init__(self, n=None, split="train", num_classes=10, image_size=32, seed=0, transform=None, style="gray"):
        if split not in _SHAPES_SPLITS:
            raise ValueError(f"split for 'shapes' must be one of {tuple(_SHAPES_SPLITS)}, got {split!r}")
        n = _SHAPES_DEFAULT_SIZE[split] if n is None else n
        images, labels = make_shapes(n, num_classes, image_size, seed=seed, split=split, style=style)
        super().__init__(images, labels, classes=SHAPE_NAMES[:num_classes], transform=transform)


# ----------------------------------------------------------------------------------------------
# Real datasets
# ----------------------------------------------------------------------------------------------


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


def _torchvision_dataset(kind: str, split: str, root: Path, download: bool, transform=None):
    import torchvision

    root = Path(root)
    try:
        if kind == "cifar10":
            if split not in ("train", "test"):
                raise ValueError(f"split for 'cifar10' must be 'train' or 'test', got {split!r}")
            train = split == "train"
            return torchvision.datasets.CIFAR10(str(root), train=train, download=download, transform=transform)
        splits = ("unlabeled", "train", "test", "train+unlabeled")
        if split not in splits:
            raise ValueError(f"split for 'stl10' must be one of {splits}, got {split!r}")
        return torchvision.datasets.STL10(str(root), split=split, download=download, transform=transform)
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


def _balanced_subset(labels: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """Indices of a seeded subset of `limit` items with classes as equal as possible (sorted)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    if (labels < 0).all():  # unlabeled data: a plain random subset
        return perm[:limit].sort().values
    # rank of every item within its class, in random order; take items round-robin by rank
    shuffled = labels[perm]
    order = torch.argsort(shuffled, stable=True)
    ranks = torch.empty_like(order)
    counts = torch.bincount(shuffled - shuffled.min())
    starts = torch.cumsum(counts, 0) - counts
    ranks[order] = torch.arange(len(order)) - starts.repeat_interleave(counts)
    pick = torch.argsort(ranks * (len(labels) + 1) + torch.arange(len(labels)), stable=True)[:limit]
    return perm[pick].sort().values


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
    if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
    kind, path = _resolve_name(name)
    if kind == "shapes":
        if split not in _SHAPES_SPLITS:
            raise ValueError(f"split for 'shapes' must be one of {tuple(_SHAPES_SPLITS)}, got {split!r}")
        n = _SHAPES_DEFAULT_SIZE[split] if limit is None else limit
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
        idx = _balanced_subset(labels, limit, seed)
        images, labels = images[idx], labels[idx]
    return images.contiguous(), labels, classes


def get_dataset(
    name: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = False,
    transform: Callable | None = None,
) -> torch.utils.data.Dataset:
    """A torch Dataset of (PIL image, or ``transform(image)``, label), torchvision style.

    Use it for large ImageFolders (ImageNet layout) with a DataLoader and
    ``TwoCropsTransform(moco_v2_transform(224))``. Names as in :func:`load_images`.

    Raises:
        ValueError / FileNotFoundError: as :func:`load_images`.
    """
    kind, path = _resolve_name(name)
    if kind == "shapes":
        return ShapesDataset(split=split, transform=transform, style=_shapes_style(name))
    if kind == "imagefolder":
        from torchvision.datasets import ImageFolder

        return ImageFolder(str(_imagefolder_dir(path, split)), transform=transform)
    root = Path(root) if root is not None else default_data_root()
    return _torchvision_dataset(kind, split, root, download, transform)


# ----------------------------------------------------------------------------------------------
# Normalisation and the torchvision (PIL) augmentations of the official MoCo recipes
# ----------------------------------------------------------------------------------------------


def normalization_stats(image_size: int = 32) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel: CIFAR-10 statistics up to 64 px, ImageNet statistics above."""
    return (CIFAR10_MEAN, CIFAR10_STD) if image_size <= 64 else (IMAGENET_MEAN, IMAGENET_STD)


def normalize(images: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """uint8 (N, 3, H, W) images -> float, scaled to [0, 1] and normalised per channel.

    The evaluation counterpart of :class:`BatchAugment` (no augmentation).
    Default mean/std: :func:`normalization_stats` of the image size.

    Shape: (N, 3, H, W) -> (N, 3, H, W) float32.
    """
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"images must be (N, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
    if mean is None or std is None:
        m, s = normalization_stats(images.shape[-1])
        mean, std = mean or m, std or s
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean_t) / std_t


class TwoCropsTransform:
    """Take two random crops of one image as the query and the key (MoCo).

    Returns ``[base_transform(x), base_transform(x)]``, exactly like the
    official ``moco.loader.TwoCropsTransform``.
    """

    def __init__(self, base_transform: Callable):
        if not callable(base_transform):
            raise ValueError(f"base_transform must be callable, got {type(base_transform).__name__}")
        self.base_transform = base_transform

    def __call__(self, x):
        q = self.base_transform(x)
        k = self.base_transform(x)
        return [q, k]

    def __repr__(self) -> str:
        return f"TwoCropsTransform({self.base_transform!r})"


def moco_v1_transform(image_size: int = 32, mean=None, std=None):
    """The MoCo v1 augmentation (He et al., 2020) as torchvision PIL transforms.

    RandomResizedCrop(scale=(0.2, 1)), RandomGrayscale(0.2),
    ColorJitter(0.4, 0.4, 0.4, 0.4), horizontal flip, ToTensor, Normalize.
    """
    from torchvision import transforms as T

    m, s = normalization_stats(image_size)
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        T.RandomGrayscale(p=0.2),
        T.ColorJitter(0.4, 0.4, 0.4, 0.4),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean or m, std or s),
    ])  # fmt: skip


def moco_v2_transform(image_size: int = 32, mean=None, std=None, blur: bool | None = None):
    """The MoCo v2 augmentation (Chen et al., 2020, "Improved baselines ...").

    RandomResizedCrop(scale=(0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1) with
    p=0.8, RandomGrayscale(0.2), GaussianBlur(sigma in [0.1, 2]) with p=0.5,
    horizontal flip, ToTensor, Normalize. Blur is skipped by default at 32 px
    and below, as in the official CIFAR-10 demo.
    """
    from torchvision import transforms as T

    m, s = normalization_stats(image_size)
    blur = image_size > 32 if blur is None else blur
    ops = [
        T.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if blur:
        kernel = 2 * math.ceil(3 * 2.0) + 1  # covers sigma up to 2 pixels, like PIL's GaussianBlur(radius)
        ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    ops += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean or m, std or s)]
    return T.Compose(ops)


# ----------------------------------------------------------------------------------------------
# Batched augmentation on tensors (any device)
# ----------------------------------------------------------------------------------------------

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL and torchvision
_HUE_OFFSETS = torch.tensor([5.0, 3.0, 1.0])  # n of R, G, B in the hue rotation (see _adjust_hue)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    return (x[:, 0:1] * _GRAY[0] + x[:, 1:2] * _GRAY[1] + x[:, 2:3] * _GRAY[2])


def _adjust_hue(x: torch.Tensor, hue: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate the HSV hue of each image by hue[i] (a fraction of a turn), keeping S and V.

    Same result as torchvision's ``adjust_hue`` (RGB -> HSV -> RGB), fused: with
    V = max, C = max - min (so V S = C) and H in sixths of a turn, channel n in
    (5, 3, 1) for (R, G, B) is V - C clamp(min(k, 4 - k), 0, 1), k = (n + H) mod 6.

    Shape: x (N, 3, H, W) in [0, 1], hue (N,) -> (N, 3, H, W); ``offsets``: the (1, 3, 1, 1)
    tensor of n (built here when not given: pass it to avoid a host-to-device copy per call).
    """
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    cr = maxc - minc  # (N, H, W) chroma
    d = torch.where(cr == 0, torch.ones_like(cr), cr)
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = h + 6.0 * hue.view(-1, 1, 1)  # hue in sixths of a turn
    n = _HUE_OFFSETS.to(x.device).view(1, 3, 1, 1) if offsets is None else offsets
    k = torch.remainder(n.to(x.dtype) + h[:, None], 6.0)  # (N, 3, H, W)
    return maxc[:, None] - cr[:, None] * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


class BatchAugment(nn.Module):
    """MoCo augmentations applied to a whole batch of tensors at once, on any device.

    Per image, like the torchvision recipes: a random resized crop (area
    fraction in ``scale``, aspect ratio log-uniform in ``ratio``) with a
    random horizontal flip, done as one affine ``grid_sample``; colour jitter
    (brightness, contrast, saturation, hue) with probability ``p_jitter``;
    grayscale with probability ``p_gray``; Gaussian blur (sigma in ``sigma``
    pixels) with probability ``p_blur``; then normalisation.

    Presets (He et al., 2020; Chen et al., 2020):

    * ``"v1"``: grayscale 0.2, then jitter (0.4, 0.4, 0.4, 0.4) always.
    * ``"v2"``: jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, then grayscale 0.2,
      then blur with p=0.5 if ``image_size > 32`` (the CIFAR demo skips it).

    Differences to torchvision: crop boxes are continuous rather than whole
    pixels, resampling is bilinear without antialiasing, and the four jitter
    operations run in a fixed order unless ``random_order=True``.

    A call reads no value on the host (no device -> host sync): every operation runs on
    the whole batch, and images it does not apply to get the identity (factor 1, hue 0,
    sigma 0). Only operations switched off in the configuration (probability 0) are skipped.

    Args:
        image_size: output side S.
        preset: "v2" or "v1"; keyword arguments below override it.
        scale: range of the crop area as a fraction of the image.
        ratio: range of the crop aspect ratio (width / height).
        p_flip: probability of a horizontal flip.
        jitter: (brightness, contrast, saturation, hue) strengths.
        p_jitter, p_gray, p_blur: probabilities.
        sigma: (min, max) blur sigma in output pixels.
        mean, std: normalisation; default :func:`normalization_stats` of image_size.
        random_order: apply the jitter operations in a random order per image.
        channels_last: return a channels_last tensor.

    Shape: uint8 or float in [0, 1] (N, 3, H, W) -> float (N, 3, S, S).

    Raises:
        ValueError: for a bad preset, probability, scale, ratio, jitter or sigma.
    """

    PRESETS = {
        "v1": dict(jitter=(0.4, 0.4, 0.4, 0.4), p_jitter=1.0, p_gray=0.2, gray_first=True, p_blur=0.0),
        "v2": dict(jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2, gray_first=False, p_blur=0.5),
    }

    def __init__(
        self,
        image_size: int = 32,
        preset: str = "v2",
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        p_flip: float = 0.5,
        jitter: tuple[float, float, float, float] | None = None,
        p_jitter: float | None = None,
        p_gray: float | None = None,
        p_blur: float | None = None,
        sigma: tuple[float, float] = (0.1, 2.0),
        mean=None,
        std=None,
        random_order: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        if preset not in self.PRESETS:
            raise ValueError(f"preset must be one of {tuple(self.PRESETS)}, got {preset!r}")
        cfg = dict(self.PRESETS[preset])
        if p_blur is None and image_size <= 32:
            cfg["p_blur"] = 0.0
        for key, val in dict(jitter=jitter, p_jitter=p_jitter, p_gray=p_gray, p_blur=p_blur).items():
            if val is not None:
                cfg[key] = val
        if not (isinstance(image_size, int) and image_size >= 1):
            raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        for key in ("p_jitter", "p_gray", "p_blur"):
            if not 0 <= cfg[key] <= 1:
                raise ValueError(f"{key} must be in [0, 1], got {cfg[key]}")
        if not 0 <= p_flip <= 1:
            raise ValueError(f"p_flip must be in [0, 1], got {p_flip}")
        b, c, s, h = (float(v) for v in cfg["jitter"])
        if min(b, c, s) < 0 or not 0 <= h <= 0.5:
            raise ValueError(
                f"jitter must be (brightness>=0, contrast>=0, saturation>=0, 0<=hue<=0.5), got {cfg['jitter']}"
            )
        if not 0 < sigma[0] <= sigma[1]:
            raise ValueError(f"sigma must satisfy 0 < min <= max, got {sigma}")
        m, sd = normalization_stats(image_size)
        self.image_size, self.preset = image_size, preset
        self.scale, self.ratio, self.p_flip = tuple(scale), tuple(ratio), p_flip
        self.jitter = (b, c, s, h)
        self.p_jitter, self.p_gray, self.p_blur = cfg["p_jitter"], cfg["p_gray"], cfg["p_blur"]
        self.gray_first = cfg["gray_first"]
        self.sigma, self.random_order, self.channels_last = tuple(sigma), random_order, channels_last
        self._mean_list, self._std_list = [float(v) for v in (mean or m)], [float(v) for v in (std or sd)]
        for name, values in (("mean", self._mean_list), ("std", self._std_list)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        # constants of the operations, built once (a tensor made from a list per call is a host-to-device copy)
        self.register_buffer("hue_offsets", _HUE_OFFSETS.view(1, 3, 1, 1).clone(), persistent=False)
        radius = math.ceil(3 * self.sigma[1])
        self.register_buffer("blur_taps", torch.arange(-radius, radius + 1, dtype=torch.float32), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, preset={self.preset!r}, scale={self.scale}, jitter={self.jitter}, "
            f"p_jitter={self.p_jitter}, p_gray={self.p_gray}, p_blur={self.p_blur}"
        )

    # -- parameter sampling -------------------------------------------------------------------
    def sample_params(self, n: int, height: int, width: int, generator=None, device="cpu") -> dict:
        """Sample the augmentation parameters of n images (all tensors of length n, on `device`).

        Keys: ``box`` (N, 4) crop x0, y0, w, h in input pixels; ``flip``; ``jitter`` (applied?);
        ``brightness``, ``contrast``, ``saturation``, ``hue`` factors (identity where not applied);
        ``order`` (N, 4) jitter order; ``gray``; ``sigma`` (0 where no blur).
        """
        out_device = torch.device(device)
        g = generator
        dev = g.device if g is not None else out_device  # a CPU generator gives the same views on any device

        def rand(*shape):
            return torch.rand(*shape, generator=g, device=dev)

        # random resized crop, as torchvision: 10 tries, then a centre crop with the ratio clamped
        area = height * width
        tries = 10
        target = area * (self.scale[0] + rand(n, tries) * (self.scale[1] - self.scale[0]))
        log_r = math.log(self.ratio[0]) + rand(n, tries) * (math.log(self.ratio[1]) - math.log(self.ratio[0]))
        ar = torch.exp(log_r)
        w, h = torch.sqrt(target * ar), torch.sqrt(target / ar)  # (N, tries)
        ok = (w <= width) & (h <= height)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros(n, dtype=torch.long, device=dev))
        w, h = w.gather(1, first[:, None])[:, 0], h.gather(1, first[:, None])[:, 0]
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fb_w, fb_h = width, width / self.ratio[0]
        elif in_ratio > self.ratio[1]:
            fb_w, fb_h = height * self.ratio[1], height
        else:
            fb_w, fb_h = width, height
        any_ok = ok.any(1)
        w = torch.where(any_ok, w, torch.full_like(w, float(fb_w)))
        h = torch.where(any_ok, h, torch.full_like(h, float(fb_h)))
        x0, y0 = rand(n) * (width - w), rand(n) * (height - h)
        fallback_x, fallback_y = (width - w) / 2, (height - h) / 2
        x0, y0 = torch.where(any_ok, x0, fallback_x), torch.where(any_ok, y0, fallback_y)
        flip = rand(n) < self.p_flip

        bj, cj, sj, hj = self.jitter
        apply = rand(n) < self.p_jitter
        bf = (1 - bj) + rand(n) * 2 * bj
        bf = bf.clamp(min=0)
        cf = ((1 - cj) + rand(n) * 2 * cj).clamp(min=0)
        sf = ((1 - sj) + rand(n) * 2 * sj).clamp(min=0)
        hf = (rand(n) * 2 - 1) * hj
        one = torch.ones(n, device=dev)
        bf, cf, sf = torch.where(apply, bf, one), torch.where(apply, cf, one), torch.where(apply, sf, one)
        hf = torch.where(apply, hf, torch.zeros_like(hf))
        if self.random_order:
            order = torch.argsort(rand(n, 4), dim=1)
        else:
            order = torch.arange(4, device=dev).expand(n, 4)
        gray = rand(n) < self.p_gray
        blur = rand(n) < self.p_blur
        sigma = self.sigma[0] + rand(n) * (self.sigma[1] - self.sigma[0])
        sigma = torch.where(blur, sigma, torch.zeros_like(sigma))
        params = dict(
            box=torch.stack((x0, y0, w, h), dim=1), flip=flip, jitter=apply, brightness=bf, contrast=cf,
            saturation=sf, hue=hf, order=order, gray=gray, sigma=sigma,
        )  # fmt: skip
        dev = torch.device(dev)
        if dev.type == out_device.type and None in (dev.index, out_device.index) or dev == out_device:
            return params
        if n == 0:
            return {key: value.to(out_device) for key, value in params.items()}
        # drawn on another device (a CPU generator for GPU images): one copy for all, not one per tensor
        cols = [v.reshape(n, -1) for v in params.values()]
        packed = torch.cat([c.to(x0.dtype) for c in cols], dim=1).to(out_device)  # exact: small ints and bools
        parts = packed.split([c.shape[1] for c in cols], dim=1)
        return {key: part.to(v.dtype).view(v.shape) for (key, v), part in zip(params.items(), parts)}

    # -- the operations ---------------------------------------------------------------------------
    def _crop_flip(self, x: torch.Tensor, box: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        n, _, height, width = x.shape
        x0, y0, w, h = box.unbind(1)
        sx = w / width * torch.where(flip, -1.0, 1.0).to(x.dtype)
        zero = torch.zeros_like(sx)
        theta = torch.stack((sx, zero, (2 * x0 + w) / width - 1, zero, h / height, (2 * y0 + h) / height - 1), dim=1)
        theta = theta.view(n, 2, 3).to(x.dtype)
        grid = F.affine_grid(theta, [n, 3, self.image_size, self.image_size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (N, 3, S, S)

    @staticmethod
    def _jitter_op(x: torch.Tensor, op: int, p: dict, hue_offsets: torch.Tensor | None = None) -> torch.Tensor:
        if op == 0:  # brightness
            return (x * p["brightness"].view(-1, 1, 1, 1)).clamp(0, 1)
        if op == 1:  # contrast: blend with the mean grey level of the image
            m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
            f = p["contrast"].view(-1, 1, 1, 1)
            return (f * x + (1 - f) * m).clamp(0, 1)
        if op == 2:  # saturation: blend with the grey image
            f = p["saturation"].view(-1, 1, 1, 1)
            return (f * x + (1 - f) * _gray(x)).clamp(0, 1)
        return _adjust_hue(x, p["hue"], hue_offsets)  # hue: rotate the hue channel in HSV; (N, 3, H, W)

    def _color_jitter(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        ops = [op for op in range(4) if self.jitter[op] > 0]  # strength 0: the identity for every image
        if self.p_jitter == 0 or not ops:
            return x
        if not self.random_order:
            for op in ops:
                x = self._jitter_op(x, op, p, self.hue_offsets)
            return x
        for pos in range(4):
            out = x
            for op in ops:
                sel = p["order"][:, pos] == op
                out = torch.where(sel.view(-1, 1, 1, 1), self._jitter_op(x, op, p, self.hue_offsets), out)
            x = out
        return x

    def _grayscale(self, x: torch.Tensor, gray: torch.Tensor) -> torch.Tensor:
        if self.p_gray == 0:
            return x
        return torch.where(gray.view(-1, 1, 1, 1), _gray(x).expand_as(x), x)

    def _blur(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.p_blur == 0:
            return x
        on = sigma > 0
        n, c, hgt, wid = x.shape
        radius = (self.blur_taps.numel() - 1) // 2
        t = self.blur_taps.to(x.dtype)  # (k,)
        s = sigma.clamp(min=1e-3).to(x.dtype)
        kern = torch.exp(-0.5 * (t[None] / s[:, None]) ** 2)
        kern = kern / kern.sum(1, keepdim=True)  # (N, k)
        kern = kern.repeat_interleave(c, dim=0)  # (N*3, k)
        y = F.pad(x.reshape(1, n * c, hgt, wid), (radius, radius, radius, radius), mode="reflect")
        y = F.conv2d(y, kern[:, None, None, :], groups=n * c)
        y = F.conv2d(y, kern[:, None, :, None], groups=n * c).view(n, c, hgt, wid)
        return torch.where(on.view(-1, 1, 1, 1), y, x)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, return_params: bool = False):
        """Augment a batch.

        Args:
            x: uint8 (N, 3, H, W) or float in [0, 1].
            generator: a torch.Generator for reproducible views; parameters are drawn on its
                device, so a CPU generator gives the same views on the CPU and on a GPU.
            return_params: also return the sampled parameters (see :meth:`sample_params`).

        Returns:
            float (N, 3, S, S) normalised views, and the parameters dict if return_params.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        n, _, height, width = x.shape
        p = self.sample_params(n, height, width, generator=generator, device=x.device)
        x = self._crop_flip(x, p["box"], p["flip"]).clamp(0, 1)  # (N, 3, S, S)
        if self.gray_first:
            x = self._color_jitter(self._grayscale(x, p["gray"]), p)
        else:
            x = self._grayscale(self._color_jitter(x, p), p["gray"])
        x = self._blur(x, p["sigma"])
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x, p) if return_params else x

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation transform with this augmentation's statistics: uint8 -> normalised float."""
        return normalize(images, self._mean_list, self._std_list)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation, for display: float (N, 3, S, S) -> [0, 1]."""
        return (x * self.std.to(x.device) + self.mean.to(x.device)).clamp(0, 1)


def describe_augmentation(params: dict, i: int) -> str:
    """A short multi-line description of the augmentation of image i, for figure captions."""
    x0, y0, w, h = (float(v) for v in params["box"][i])
    lines = [f"crop {w:.0f}x{h:.0f} @({x0:.0f},{y0:.0f})" + (" flip" if bool(params["flip"][i]) else "")]
    if bool(params["jitter"][i]):
        lines.append(
            f"b{float(params['brightness'][i]):.2f} c{float(params['contrast'][i]):.2f} "
            f"s{float(params['saturation'][i]):.2f} h{float(params['hue'][i]):+.2f}"
        )
    else:
        lines.append("no jitter")
    extra = []
    if bool(params["gray"][i]):
        extra.append("gray")
    if float(params["sigma"][i]) > 0:
        extra.append(f"blur s={float(params['sigma'][i]):.1f}")
    if extra:
        lines.append(" ".join(extra))
    return "\n".join(lines)

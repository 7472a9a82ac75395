"""The bundled synthetic dataset "shapes": one object per image, the class is its shape.

:func:`make_shapes` draws each image's object (circle, ring, square, ... semicircle) with
everything else a nuisance that raw pixels cannot see past, but that the MoCo augmentations
teach an encoder to ignore: grey levels, background texture, position, size, rotation,
clutter. The styles (:data:`SHAPES_STYLES`) set how strong each nuisance is: "gray" (the
default), "color" (random hues, which the MoCo v2 augmentation does not remove well enough
for a short run), "outline" (the same classes drawn as outlines, a second domain for
transfer) and "lab" (the object has a hue of its own, so that the L and ab channels of Lab
both show it, for CMC).

Letter legend: N images, S image side.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .checks import choice, integer, nonneg_int

__all__ = ["SHAPE_NAMES", "SHAPES_STYLES", "SHAPES_NAMES", "SHAPES_SPLITS", "SHAPES_DEFAULT_SIZE", "make_shapes"]

SHAPES_NAMES = ("shapes", "shapes-color", "shapes-outline", "shapes-lab")  # "shapes-STYLE": SHAPES_STYLES[STYLE]

SHAPE_NAMES = (
    "circle", "ring", "square", "triangle", "cross", "star",
    "crescent", "ell", "bars", "tee", "frame", "semicircle",
)  # fmt: skip
SHAPES_DEFAULT_SIZE = {"train": 5000, "test": 1000}
SHAPES_SPLITS = {"train": 0, "test": 1}
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
    n = nonneg_int(n, "n")
    num_classes = integer(num_classes, "num_classes", 2, len(SHAPE_NAMES))
    image_size = integer(image_size, "image_size", 8)
    choice(split, "split for 'shapes'", SHAPES_SPLITS)
    choice(style, "style", SHAPES_STYLES)
    names = SHAPE_NAMES[:num_classes]
    chunk = _CHUNK_PER_CLASS * num_classes
    images, labels = [], []
    for i in range(math.ceil(n / chunk)):
        g = torch.Generator().manual_seed(_mix_seed(seed, SHAPES_SPLITS[split], num_classes, i, 0))
        # consecutive blocks of num_classes images hold every class once: prefixes stay balanced
        y = torch.cat([torch.randperm(num_classes, generator=g) for _ in range(_CHUNK_PER_CLASS)])
        m = min(chunk, n - i * chunk)
        y = y[:m]
        chunk_seed = _mix_seed(seed, SHAPES_SPLITS[split], num_classes, i, 1)
        images.append(_render_shapes_chunk(y, names, image_size, chunk_seed, n_draw=chunk, style=SHAPES_STYLES[style]))
        labels.append(y)
    if not images:
        return torch.empty(0, 3, image_size, image_size, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return torch.cat(images), torch.cat(labels).long()


"""The MoCo augmentations on batches of tensors, and the normalisation that goes with them.

- :class:`BatchAugment` applies the MoCo v1 / v2 augmentation recipes to a whole uint8 batch at
  once, on any device (crop and flip, colour jitter, grayscale, blur, normalisation).
- :func:`normalize` is the evaluation transform (no augmentation): uint8 -> normalised float;
  :func:`denormalize` undoes the normalisation, for display and for colour conversions.
- :func:`describe_augmentation` writes the caption of one augmented view.

Letter legend: N images in a batch, H x W input size, S output size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checks import choice, positive_int, probability
from .datasets import normalization_stats

__all__ = ["normalize", "denormalize", "BatchAugment", "describe_augmentation"]


def _stats(x: torch.Tensor, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std as (C, 1, 1) tensors of x's dtype and device; default
    :func:`~mocolab.datasets.normalization_stats` of the image size."""
    m, s = normalization_stats(x.shape[-1])
    mean, std = (m if mean is None else mean), (s if std is None else std)
    return (torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1),
            torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1))


def normalize(images: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """uint8 (N, 3, H, W) images -> float, scaled to [0, 1] and normalised per channel.

    The evaluation counterpart of :class:`BatchAugment` (no augmentation).
    Default mean/std: :func:`normalization_stats` of the image size.

    Shape: (N, 3, H, W) -> (N, 3, H, W) float32.
    """
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"images must be (N, 3, H, W) or (3, H, W), got {tuple(images.shape)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean_t, std_t = _stats(x, mean, std)
    return (x - mean_t) / std_t


def denormalize(x: torch.Tensor, mean: Sequence[float] | torch.Tensor | None = None,
                std: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """Undo :func:`normalize` (and :class:`BatchAugment`'s normalisation): ``x·std + mean``, in float32.

    Values are not clamped (clamp to [0, 1] for display). Default mean/std:
    :func:`~mocolab.datasets.normalization_stats` of the image size.

    Shape: (N, C, H, W) or (C, H, W) -> the same, float32.
    """
    x = x.float()
    mean_t, std_t = _stats(x, mean, std)
    return x * std_t + mean_t


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
        choice(preset, "preset", self.PRESETS)
        image_size = positive_int(image_size, "image_size")
        cfg = dict(self.PRESETS[preset])
        if p_blur is None and image_size <= 32:
            cfg["p_blur"] = 0.0
        for key, val in dict(jitter=jitter, p_jitter=p_jitter, p_gray=p_gray, p_blur=p_blur).items():
            if val is not None:
                cfg[key] = val
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        for key in ("p_jitter", "p_gray", "p_blur"):
            cfg[key] = probability(cfg[key], key)
        p_flip = probability(p_flip, "p_flip")
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
        return denormalize(x, self.mean.to(x.device), self.std.to(x.device)).clamp(0, 1)


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

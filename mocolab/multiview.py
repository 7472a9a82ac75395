"""Contrastive Multiview Coding (CMC, Tian, Krishnan & Isola 2019, arXiv 1906.05849) with MoCo's machinery.

Letters: N batch size, C feature dim, K queue size, H x W image size.

CMC treats two *channels* of one image as two views: the luminance L and the
chrominance ab of the CIE Lab colour space. One encoder per view learns what the
views share (shapes and edges visible in both, not the colour itself). Here each view
has a query encoder, a momentum key encoder (:class:`~mocolab.momentum.MomentumUpdater`)
and a queue (:class:`~mocolab.queue.KeyQueue`), as in MoCo; the loss is symmetric:
L queries against ab keys, plus ab queries against L keys.

- :func:`rgb_to_lab`: sRGB in [0, 1] to CIE Lab (D65), on tensors.
- :func:`lab_views`: a normalised RGB batch (what :class:`~mocolab.augment.BatchAugment`
  returns) to the L view (N, 1, H, W) and the ab view (N, 2, H, W), scaled to about [-1, 1].
- :class:`CMC`: the two-view model with the shared training interface.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .augment import denormalize
from .datasets import normalization_stats
from .interface import ContrastiveModel, unwrap
from .losses import check_temperature, infonce_logits
from .momentum import MomentumUpdater, check_momentum, freeze
from .queue import KeyQueue

__all__ = ["rgb_to_lab", "lab_views", "CMC", "CMCFeatures", "CMC_VIEWS"]

CMC_VIEWS = ("two_crops", "same_crop")

# sRGB (D65) -> XYZ, and the D65 reference white (the values used by scikit-image and colormath)
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423),
               (0.212671, 0.715160, 0.072169),
               (0.019334, 0.119193, 0.950227))
_WHITE_D65 = (0.95047, 1.0, 1.08883)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """Convert sRGB in [0, 1] to CIE Lab (D65 white): L in [0, 100], a and b roughly in [-110, 110].

    sRGB gamma is undone, the linear RGB mapped to XYZ and normalised by the D65 white, then
    ``L = 116 f(Y) − 16``, ``a = 500 (f(X) − f(Y))``, ``b = 200 (f(Y) − f(Z))`` with the
    CIE function f (cube root above (6/29)³, linear below).

    Shape:
        (..., 3, H, W) -> (..., 3, H, W), channels (L, a, b).

    Raises:
        ValueError: the channel dimension (third from last) is not 3.
    """
    if rgb.dim() < 3 or rgb.shape[-3] != 3:
        raise ValueError(f"rgb must be (..., 3, H, W), got {tuple(rgb.shape)}")
    x = rgb.float().clamp(0.0, 1.0)
    lin = torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055).pow(2.4))  # linear RGB
    m = torch.tensor(_RGB_TO_XYZ, dtype=lin.dtype, device=lin.device)
    xyz = torch.einsum("ij,...jhw->...ihw", m, lin)  # (..., 3, H, W)
    xyz = xyz / torch.tensor(_WHITE_D65, dtype=lin.dtype, device=lin.device).view(3, 1, 1)
    eps = (6.0 / 29.0) ** 3
    f = torch.where(xyz > eps, xyz.clamp_min(eps).pow(1.0 / 3.0), xyz / (3 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(dim=-3)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-3)


def lab_views(x: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
    """Split a normalised RGB batch into CMC's two views, L and ab.

    The normalisation (``(x/255 − mean)/std`` of :func:`~mocolab.augment.normalize` and
    :class:`~mocolab.augment.BatchAugment`) is undone, the image converted with :func:`rgb_to_lab`,
    and the views scaled to about [-1, 1]: ``(L − 50)/50`` and ``ab/110``.

    Args:
        x: normalised RGB images.
        mean, std: the per-channel normalisation of ``x``; default
            :func:`~mocolab.datasets.normalization_stats` of the image size.

    Shape:
        x: (N, 3, H, W) -> L (N, 1, H, W), ab (N, 2, H, W).

    Raises:
        ValueError: x not (N, 3, H, W).
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"x must be a normalised RGB batch (N, 3, H, W), got {tuple(x.shape)}")
    lab = rgb_to_lab(denormalize(x, mean, std))  # (N, 3, H, W)
    return (lab[:, :1] - 50.0) / 50.0, lab[:, 1:] / 110.0  # (N, 1, H, W), (N, 2, H, W)


class CMCFeatures(nn.Module):
    """Evaluation features of a :class:`CMC` model from normalised RGB images.

    ``view="both"`` (CMC's evaluation): the concatenation of the L and ab encoders'
    L2-normalised outputs, (N, 2C); ``"L"`` or ``"ab"``: one view's output, (N, C).
    It shares the model's query encoders (no copy), so it follows training.

    Shape:
        (N, 3, H, W) normalised RGB -> (N, 2C) or (N, C).
    """

    def __init__(self, model: CMC, view: str = "both"):
        super().__init__()
        if view not in ("both", "L", "ab"):
            raise ValueError(f"view must be 'both', 'L' or 'ab', got {view!r}")
        self.encoder_l, self.encoder_ab, self.view = unwrap(model.encoder_l), unwrap(model.encoder_ab), view
        self.mean, self.std = model.mean, model.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l, ab = lab_views(x, self.mean, self.std)
        if self.view == "L":
            return self.encoder_l(l)
        if self.view == "ab":
            return self.encoder_ab(ab)
        return torch.cat([F.normalize(self.encoder_l(l), dim=1), F.normalize(self.encoder_ab(ab), dim=1)], dim=1)


class CMC(ContrastiveModel):
    """Two-view CMC (L and ab) with momentum key encoders and one queue per view.

    Views: with ``views="two_crops"`` (default) the L view comes from ``im_q`` and the ab view
    from ``im_k``, two differently augmented crops of the image, so the encoders must agree
    across both the channel split and the augmentation (CMC's views combined with MoCo's
    instance discrimination). With ``views="same_crop"`` both come from ``im_q``, as in the
    CMC paper's Lab experiments (``im_k`` is ignored). Note that a grayscale augmentation
    leaves an ab view with no content; CMC does not use it.

    Loss (symmetric): ``L_{L→ab} + L_{ab→L}``, where ``L_{L→ab}`` is InfoNCE of the L query
    against the ab key of the same image and the queue of earlier ab keys, and vice versa.
    ``forward`` returns the 2N rows of both directions (L queries first).

    Args:
        base_encoder: ``base_encoder(num_classes=dim, in_channels=c)`` for c = 1 (L) and 2 (ab),
            e.g. :class:`~mocolab.encoders.ConvNet` or ``functools.partial(ConvNet, width=16)``.
        dim: C, the embedding dimension of each view.
        K: size of each view's queue.
        m: momentum of both key encoders, in [0, 1].
        T: temperature > 0.
        views: ``"two_crops"`` or ``"same_crop"`` (see above).
        mean, std: the normalisation of the input images (default: CIFAR-10 statistics, as BatchAugment at 32 px).
        queue_init: ``"random"`` or ``"empty"`` (see :class:`~mocolab.queue.KeyQueue`).
        out_bn: end each view's encoder with a ``BatchNorm1d(dim)`` before the L2 normalisation
            (default True; CMC's AlexNet halves also normalise their fully connected layers). A freshly
            initialised small ConvNet maps every image to nearly the same direction; MoCo's query and key
            encoders start as copies, so their small variations agree from the first step, but CMC's two
            encoders are unrelated. Without the output BN they align on that shared direction and stay
            there (the L·ab cosine of an image's two views equals that of different images). The BN
            removes the shared direction.

    Shape:
        forward(im_q (N, 3, H, W), im_k (N, 3, H, W)) -> logits (2N, 1+K), labels (2N,) zeros.

    Raises:
        ValueError: an argument outside its range (the message says what is allowed).
    """

    trained_encoders = ("encoder_l", "encoder_ab")  # one query encoder per view; the key encoders follow by momentum

    def __init__(self, base_encoder: Callable[..., nn.Module], dim: int = 128, K: int = 4096, m: float = 0.99,
                 T: float = 0.07, *, views: str = "two_crops", mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, queue_init: str = "random", out_bn: bool = True):
        super().__init__()
        if views not in CMC_VIEWS:
            raise ValueError(f"views must be one of {CMC_VIEWS}, got {views!r}")
        self.m, self.T, self.views = check_momentum(m), check_temperature(T), views
        m0, s0 = normalization_stats(32)
        self.mean, self.std = tuple(mean or m0), tuple(std or s0)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std must be 3 numbers each, std > 0; got {mean}, {std}")
        self.out_bn = bool(out_bn)
        self.encoder_l = self._view_encoder(base_encoder, dim, in_channels=1)
        self.encoder_ab = self._view_encoder(base_encoder, dim, in_channels=2)
        self.encoder_l_k = freeze(copy.deepcopy(self.encoder_l))
        self.encoder_ab_k = freeze(copy.deepcopy(self.encoder_ab))
        self.queue_l = KeyQueue(dim, K, init=queue_init)  # L keys: negatives of the ab queries
        self.queue_ab = KeyQueue(dim, K, init=queue_init)  # ab keys: negatives of the L queries
        self._updaters()

    def _view_encoder(self, base_encoder: Callable[..., nn.Module], dim: int, in_channels: int) -> nn.Module:
        encoder = base_encoder(num_classes=dim, in_channels=in_channels)
        return nn.Sequential(encoder, nn.BatchNorm1d(dim)) if self.out_bn else encoder  # (N, C)

    def _updaters(self) -> None:
        self._momentum = [MomentumUpdater(self.encoder_l_k, self.encoder_l),
                          MomentumUpdater(self.encoder_ab_k, self.encoder_ab)]

    def _apply(self, fn, *args, **kwargs):  # .to() may replace tensors: gather them again
        out = super()._apply(fn, *args, **kwargs)
        if hasattr(self, "_momentum"):
            self._updaters()
        return out

    def encoder_for_eval(self, view: str = "both") -> CMCFeatures:
        """A module mapping normalised RGB images to CMC features (both views concatenated by default)."""
        return CMCFeatures(self, view)

    def eval_encoder(self) -> CMCFeatures:
        """CMC's evaluation features, both views concatenated (what the kNN monitor of ``fit`` evaluates)."""
        return self.encoder_for_eval("both")

    def compile_encoders(self) -> None:
        """``Module.compile`` the four encoders, in place."""
        for encoder in (self.encoder_l, self.encoder_ab, self.encoder_l_k, self.encoder_ab_k):
            encoder.compile()

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor | None = None, index: torch.Tensor | None = None):
        """One CMC step: logits of both directions, then the momentum updates and the enqueues.

        Args:
            im_q: normalised RGB images, (N, 3, H, W) (the L view; also the ab view with ``"same_crop"``).
            im_k: the other crop, (N, 3, H, W) (the ab view with ``"two_crops"``).
            index: optional dataset indices (N,), recorded beside the keys in both queues.

        Returns:
            ``(logits, labels)``: logits (2N, 1+K) already divided by T (L queries, then ab queries), labels zeros.
        """
        if self.views == "two_crops":
            if im_k is None:
                raise ValueError("views='two_crops' needs im_k (the second crop)")
            l, _ = lab_views(im_q, self.mean, self.std)
            _, ab = lab_views(im_k, self.mean, self.std)
        else:
            l, ab = lab_views(im_q, self.mean, self.std)  # (N, 1, H, W), (N, 2, H, W)
        with torch.no_grad():
            for update in self._momentum:
                update(self.m)
            k_l = F.normalize(self.encoder_l_k(l), dim=1)  # (N, C)
            k_ab = F.normalize(self.encoder_ab_k(ab), dim=1)  # (N, C)
        # the queues are overwritten in place below, so the logits must not hold views of them
        logits_l, _ = infonce_logits(self.encoder_l(l), k_ab, self.queue_ab.negatives().clone(), self.T,
                                     normalize=True)  # L queries: (N, 1+K)
        logits_ab, _ = infonce_logits(self.encoder_ab(ab), k_l, self.queue_l.negatives().clone(), self.T,
                                      normalize=True)  # ab queries: (N, 1+K)
        logits = torch.cat([logits_l, logits_ab], dim=0)  # (2N, 1+K)
        self.queue_l.enqueue(k_l, index)
        self.queue_ab.enqueue(k_ab, index)
        return logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``L_{L→ab} + L_{ab→L}``: twice the cross-entropy averaged over the 2N rows."""
        return 2.0 * F.cross_entropy(logits, labels)

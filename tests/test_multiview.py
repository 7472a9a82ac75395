"""CMC: rgb -> Lab against reference values and a per-pixel oracle, the two-view model's interface."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mocolab.augment import normalize
from mocolab.multiview import CMC, lab_views, rgb_to_lab

# sRGB -> CIE Lab (D65), reference values as published by colour-science tables / scikit-image
REFERENCE = [
    ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032)),
    ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793)),
    ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602)),
    ((0.5, 0.5, 0.5), (53.3889, 0.0, 0.0)),
]


@pytest.mark.parametrize("rgb,lab", REFERENCE)
def test_rgb_to_lab_reference_values(rgb, lab):
    x = torch.tensor(rgb).view(3, 1, 1)
    got = rgb_to_lab(x).view(3)
    torch.testing.assert_close(got, torch.tensor(lab), atol=2e-2, rtol=0)


def naive_lab(r, g, b):
    """The CIE formulas for one pixel, in plain Python floats."""
    def lin(c):
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = lin(r), lin(g), lin(b)
    X = (0.412453 * r + 0.357580 * g + 0.180423 * b) / 0.95047
    Y = 0.212671 * r + 0.715160 * g + 0.072169 * b
    Z = (0.019334 * r + 0.119193 * g + 0.950227 * b) / 1.08883

    def f(t):
        return t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29
    return 116 * f(Y) - 16, 500 * (f(X) - f(Y)), 200 * (f(Y) - f(Z))


def test_rgb_to_lab_matches_per_pixel_oracle_on_a_batch():
    x = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    x[0, :, 0, 0] = 0.001  # a dark pixel: the linear branch of f
    lab = rgb_to_lab(x)
    assert lab.shape == x.shape
    for n in range(2):
        for i in range(4):
            for j in range(5):
                expected = torch.tensor(naive_lab(*x[n, :, i, j].tolist()))
                torch.testing.assert_close(lab[n, :, i, j], expected, atol=1e-3, rtol=1e-4)


def test_rgb_to_lab_bad_shape():
    with pytest.raises(ValueError, match="3, H, W"):
        rgb_to_lab(torch.rand(2, 4, 8, 8))


def test_lab_views_undo_the_normalisation():
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    l, ab = lab_views(normalize(images))
    assert l.shape == (3, 1, 8, 8) and ab.shape == (3, 2, 8, 8)
    lab = rgb_to_lab(images.float() / 255)
    torch.testing.assert_close(l, (lab[:, :1] - 50) / 50, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ab, lab[:, 1:] / 110, atol=1e-4, rtol=1e-4)
    assert float(l.abs().max()) <= 1.0 + 1e-5 and float(ab.abs().max()) <= 1.0 + 1e-5


@pytest.mark.parametrize("out_bn", [True, False])
@pytest.mark.parametrize("views", ["two_crops", "same_crop"])
def test_cmc_forward_shapes_loss_and_symmetric_oracle(tiny_encoder, views, out_bn):
    torch.manual_seed(0)
    model = CMC(tiny_encoder, dim=16, K=32, m=0.9, T=0.2, views=views, out_bn=out_bn)
    conv_l, conv_ab = (model.encoder_l[0], model.encoder_ab[0]) if out_bn else (model.encoder_l, model.encoder_ab)
    if out_bn:  # the output BatchNorm1d of each view's encoder, and of its key copy
        for enc in (model.encoder_l, model.encoder_ab, model.encoder_l_k, model.encoder_ab_k):
            assert isinstance(enc[1], torch.nn.BatchNorm1d) and enc[1].num_features == 16
    assert conv_l.features[0][0].in_channels == 1
    assert conv_ab.features[0][0].in_channels == 2
    im_q, im_k = (normalize(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)) for _ in range(2))
    queue_l, queue_ab = model.queue_l.queue.clone(), model.queue_ab.queue.clone()
    # oracle: the two directions written out
    l, _ = lab_views(im_q)
    ab = lab_views(im_k if views == "two_crops" else im_q)[1]
    # the key encoders start as copies of the query encoders, so the first momentum update keeps them
    logits, labels = model(im_q, im_k, index=torch.arange(4))
    assert logits.shape == (8, 33) and labels.tolist() == [0] * 8
    with torch.no_grad():
        q_l, q_ab = F.normalize(model.encoder_l(l), dim=1), F.normalize(model.encoder_ab(ab), dim=1)
        k_l, k_ab = F.normalize(model.encoder_l_k(l), dim=1), F.normalize(model.encoder_ab_k(ab), dim=1)
    exp_l = torch.cat([(q_l * k_ab).sum(1, keepdim=True), q_l @ queue_ab], 1) / 0.2
    exp_ab = torch.cat([(q_ab * k_l).sum(1, keepdim=True), q_ab @ queue_l], 1) / 0.2
    torch.testing.assert_close(logits.detach(), torch.cat([exp_l, exp_ab]), atol=1e-4, rtol=1e-4)
    # each view's keys went into its own queue, with the indices
    torch.testing.assert_close(model.queue_l.queue[:, :4], k_l.t())
    torch.testing.assert_close(model.queue_ab.queue[:, :4], k_ab.t())
    assert model.queue_ab.queue_index[:4].tolist() == [0, 1, 2, 3]
    loss = model.loss(logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits[:4], labels[:4]) + F.cross_entropy(logits[4:], labels[4:]))
    loss.backward()
    assert all(p.grad is None for p in model.encoder_l_k.parameters())
    assert all(p.grad is None for p in model.encoder_ab_k.parameters())
    assert conv_l.fc.weight.grad is not None and conv_ab.fc.weight.grad is not None


def test_cmc_momentum_update_of_both_key_encoders(tiny_encoder):
    torch.manual_seed(0)
    model = CMC(tiny_encoder, dim=16, K=32, m=0.5, T=0.2)
    with torch.no_grad():
        for p in list(model.encoder_l.parameters()) + list(model.encoder_ab.parameters()):
            p.add_(1.0)
    before_l = [p.clone() for p in model.encoder_l_k.parameters()]
    x = torch.randn(2, 3, 32, 32)
    model(x, x)
    for pk, pk0, pq in zip(model.encoder_l_k.parameters(), before_l, model.encoder_l.parameters()):
        torch.testing.assert_close(pk, 0.5 * pk0 + 0.5 * pq)
    model.to("cpu")  # re-gathers the tensors of the momentum updaters
    model(x, x)


def test_cmc_eval_features_concatenate_normalised_views(tiny_encoder):
    torch.manual_seed(0)
    model = CMC(tiny_encoder, dim=16, K=32)
    x = normalize(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    model.eval()
    feats = model.encoder_for_eval()(x)
    assert feats.shape == (3, 32)
    torch.testing.assert_close(feats[:, :16].norm(dim=1), torch.ones(3))
    torch.testing.assert_close(feats[:, 16:].norm(dim=1), torch.ones(3))
    l, ab = lab_views(x)
    torch.testing.assert_close(feats[:, :16], F.normalize(model.encoder_l(l), dim=1))
    assert model.encoder_for_eval("ab")(x).shape == (3, 16)
    torch.testing.assert_close(model.eval_encoder()(x), feats)  # what the kNN monitor of fit() uses
    with pytest.raises(ValueError, match="view"):
        model.encoder_for_eval("rgb")


def test_cmc_trains_with_fit(tiny_encoder):
    from mocolab.augment import BatchAugment
    from mocolab.train import TrainConfig, fit

    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(16) % 2
    model = CMC(tiny_encoder, dim=16, K=32, m=0.9, T=0.2)
    hist = fit(model, images, BatchAugment(32, p_gray=0.0), TrainConfig(epochs=1, batch_size=8, knn_k=5),
               eval_data=(images, labels, images, labels), device="cpu", verbose=False)
    assert len(hist["loss"]) == 1 and len(hist["knn_acc"]) == 1


@pytest.mark.parametrize("kw,match", [(dict(views="three"), "views"), (dict(T=-1), "temperature"),
                                      (dict(m=2), "momentum"), (dict(K=0), "K"),
                                      (dict(std=(1, 0, 1)), "std")])
def test_cmc_bad_arguments(tiny_encoder, kw, match):
    with pytest.raises(ValueError, match=match):
        CMC(tiny_encoder, dim=16, **{"K": 32, **kw})


def test_cmc_two_crops_needs_im_k(tiny_encoder):
    model = CMC(tiny_encoder, dim=16, K=32)
    with pytest.raises(ValueError, match="im_k"):
        model(torch.randn(2, 3, 32, 32))


def test_cmc_output_bn_centres_each_views_features_over_the_batch(tiny_encoder):
    torch.manual_seed(0)
    x = normalize(torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8))
    l, ab = lab_views(x)
    with_bn, without = CMC(tiny_encoder, dim=16, K=32, out_bn=True), CMC(tiny_encoder, dim=16, K=32, out_bn=False)
    f = with_bn.encoder_l(l)  # train mode: batch statistics
    torch.testing.assert_close(f.mean(0), torch.zeros(16), atol=1e-5, rtol=0)  # BN's bias starts at 0
    raw = without.encoder_l(l)
    assert raw.mean(0).abs().max() > 1e-3  # without it, the features share a common offset

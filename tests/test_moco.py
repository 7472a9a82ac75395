"""MoCo against the official builder's computation, written out with plain tensor ops."""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F

from mocolab.baselines import EndToEnd, MemoryBankModel
from mocolab.moco import MoCo
from mocolab.syncs import count_host_syncs


class OfficialReference:
    """facebookresearch/moco builder.py on one process, as plain tensor ops (no shuffle)."""

    def __init__(self, model):
        self.q = copy.deepcopy(model.encoder_q)
        self.k = copy.deepcopy(model.encoder_k)
        self.queue = model.queue.clone()
        self.ptr = 0
        self.m, self.T, self.K = model.m, model.T, model.K

    def step(self, im_q, im_k):
        q = F.normalize(self.q(im_q), dim=1)
        with torch.no_grad():
            for pk, pq in zip(self.k.parameters(), self.q.parameters()):
                pk.data = pk.data * self.m + pq.data * (1.0 - self.m)
            k = F.normalize(self.k(im_k), dim=1)
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        bs = k.shape[0]
        assert self.K % bs == 0
        self.queue[:, self.ptr:self.ptr + bs] = k.T
        self.ptr = (self.ptr + bs) % self.K
        return logits


def test_forward_matches_official_over_several_steps(tiny_encoder):
    # float64, so that rounding differences of 1e-7 are not amplified by a few SGD steps
    torch.manual_seed(0)
    model = MoCo(tiny_encoder, dim=16, K=24, m=0.9, T=0.2, shuffle_bn="off").double()
    ref = OfficialReference(model)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.q.parameters(), lr=0.1)
    for _ in range(5):
        im_q, im_k = torch.randn(8, 3, 16, 16).double(), torch.randn(8, 3, 16, 16).double()
        logits, labels = model(im_q, im_k)
        ref_logits = ref.step(im_q, im_k)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-9)
        assert logits.shape == (8, 25) and labels.tolist() == [0] * 8
        torch.testing.assert_close(model.queue, ref.queue, rtol=1e-9, atol=1e-9)
        assert int(model.queue_ptr) == ref.ptr
        for a, b in zip(model.encoder_k.parameters(), ref.k.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        loss, ref_loss = model.criterion(logits, labels), F.cross_entropy(ref_logits, labels)
        opt.zero_grad(), ref_opt.zero_grad()
        loss.backward(), ref_loss.backward()
        opt.step(), ref_opt.step()


def test_official_names_and_state_dict_keys(tiny_encoder):
    model = MoCo(tiny_encoder, dim=16, K=32)
    keys = model.state_dict().keys()
    assert {"queue", "queue_ptr"} <= set(keys)
    assert any(k.startswith("encoder_q.") for k in keys) and any(k.startswith("encoder_k.") for k in keys)
    assert model.queue.shape == (16, 32)
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(32))


def test_an_official_state_dict_loads_strictly(tiny_encoder):
    """The official builder's state dict has only encoder_q.*, encoder_k.*, queue and queue_ptr."""
    src = MoCo(tiny_encoder, dim=16, K=32)
    src(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))  # ptr 4
    official = {k: v.clone() for k, v in src.state_dict().items() if not k.startswith("queue_") or k == "queue_ptr"}
    assert not {"queue_filled", "queue_index", "queue_step", "queue_count"} & set(official)
    model = MoCo(tiny_encoder, dim=16, K=32, queue_init="empty")
    model.load_state_dict(official)  # strict
    torch.testing.assert_close(model.queue, src.queue)
    assert int(model.queue_ptr) == 4 and int(model.queue_filled) == 32 and model.negatives().shape == (16, 32)
    assert (model.queue_index == -1).all() and (model.queue_step == -1).all()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        model.load_state_dict({**official, "extra": torch.zeros(1)})


def test_no_gradient_reaches_key_branch(tiny_encoder):
    model = MoCo(tiny_encoder, dim=16, K=32, m=0.99)
    logits, labels = model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    model.loss(logits, labels).backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert all(not p.requires_grad for p in model.encoder_k.parameters())
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert not model.queue.requires_grad


def test_initial_loss_is_about_ln_k_plus_1(tiny_encoder):
    torch.manual_seed(0)
    model = MoCo(tiny_encoder, dim=128, K=1024, m=0.99, T=0.07)
    x = torch.randn(64, 3, 16, 16)
    logits, labels = model(x, x)
    # q and k identical at init: the positive stands out, so just bound it
    assert model.loss(logits, labels).item() < math.log(1025)
    model2 = MoCo(tiny_encoder, dim=128, K=1024, T=100.0)  # at huge T every candidate looks alike
    logits, labels = model2(torch.randn(64, 3, 16, 16), torch.randn(64, 3, 16, 16))
    assert model2.loss(logits, labels).item() == pytest.approx(math.log(1025), abs=1e-2)


def test_any_K_wraps_around_and_empty_queue(tiny_encoder):
    model = MoCo(tiny_encoder, dim=16, K=10, queue_init="empty", shuffle_bn="off")
    logits, _ = model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    assert logits.shape == (4, 1)  # no real keys yet: only the positive
    for _ in range(3):
        logits, _ = model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    assert logits.shape == (4, 11) and int(model.queue_ptr) == 16 % 10


def test_split_bn_mode_and_symmetric(tiny_encoder):
    torch.manual_seed(0)
    model = MoCo(tiny_encoder, dim=16, K=32, shuffle_bn="split", bn_splits=4, symmetric=True)
    from mocolab.shuffle_bn import SplitBatchNorm
    assert any(isinstance(m, SplitBatchNorm) for m in model.encoder_k.modules())
    im_q, im_k = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    logits, labels = model(im_q, im_k, index=torch.arange(8))
    assert logits.shape == (16, 33) and int(model.queue_ptr) == 16
    loss = model.loss(logits, labels)
    assert loss.item() == pytest.approx(2 * F.cross_entropy(logits, labels).item())


def test_split_shuffle_does_not_change_keys_in_eval_like_bn(tiny_encoder):
    # with one split, shuffling inside the batch must give the same keys as no shuffling
    torch.manual_seed(0)
    a = MoCo(tiny_encoder, dim=16, K=32, shuffle_bn="split", bn_splits=1)
    b = MoCo(tiny_encoder, dim=16, K=32, shuffle_bn="off")
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 3, 16, 16)
    torch.testing.assert_close(a._keys(x), b._keys(x), rtol=1e-5, atol=1e-6)


def test_split_bn_without_key_shuffle_keeps_groups_aligned(tiny_encoder):
    # shuffle_keys=False: keys of sample i are normalised within the same BN group as query i
    torch.manual_seed(0)
    a = MoCo(tiny_encoder, dim=16, K=32, shuffle_bn="split", bn_splits=4, shuffle_keys=False)
    assert a.shuffle_keys is False and MoCo(tiny_encoder, dim=16, K=32, shuffle_bn="split").shuffle_keys
    x = torch.randn(8, 3, 16, 16)
    expected = F.normalize(a.encoder_k(x), dim=1)  # no permutation: group g holds samples 2g, 2g+1
    torch.manual_seed(1)
    torch.testing.assert_close(a._keys(x), expected)
    # with the shuffle (the default) the same input gives different keys: the BN groups changed
    b = MoCo(tiny_encoder, dim=16, K=32, shuffle_bn="split", bn_splits=4)
    b.load_state_dict(a.state_dict())
    assert not torch.allclose(b._keys(x), expected, atol=1e-4)


def test_mlp_head_and_momentum_schedule(tiny_encoder):
    model = MoCo(tiny_encoder, dim=16, K=32, mlp=True, m=0.99, momentum_schedule="cosine")
    assert isinstance(model.encoder_q.fc, torch.nn.Sequential)
    assert model.set_progress(100, 100) == pytest.approx(1.0)


@pytest.mark.parametrize("kw,match", [
    (dict(T=0), "temperature"), (dict(m=1.2), r"\[0, 1\]"), (dict(K=0), "K"),
    (dict(shuffle_bn="sync"), "shuffle_bn"), (dict(queue_init="zeros"), "init"),
    (dict(momentum_schedule="linear"), "momentum_schedule"), (dict(dim=0), "dim"),
])
def test_bad_arguments(tiny_encoder, kw, match):
    with pytest.raises(ValueError, match=match):
        MoCo(tiny_encoder, **kw)


def test_end_to_end_baseline(tiny_encoder):
    model = EndToEnd(tiny_encoder, dim=16, T=0.1)
    logits, labels = model(torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16))
    assert logits.shape == (6, 6) and labels.tolist() == list(range(6))
    model.loss(logits, labels).backward()
    assert model.encoder_q.fc.weight.grad is not None


@pytest.mark.parametrize("loss", ["softmax", "nce"])
def test_memory_bank_baseline(tiny_encoder, loss):
    model = MemoryBankModel(tiny_encoder, num_samples=50, dim=16, K=20, T=0.1, loss=loss)
    index = torch.arange(6)
    before = model.bank.memory[index].clone()
    logits, labels = model(torch.randn(6, 3, 16, 16), None, index=index)
    assert logits.shape == (6, 21)
    assert not torch.equal(model.bank.memory[index], before)
    assert torch.isfinite(model.loss(logits, labels))
    with pytest.raises(ValueError, match="index"):
        model(torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("kw", [
    dict(shuffle_bn="off"), dict(shuffle_bn="split", bn_splits=4),
    dict(shuffle_bn="split", bn_splits=2, symmetric=True),
    dict(shuffle_bn="off", queue_init="empty", K=10), dict(shuffle_bn="split", bn_splits=4, shuffle_keys=False),
])
def test_step_makes_no_host_sync(tiny_encoder, kw):
    # a host read (.item(), bool(t), int(t), ...) in the step would stop the GPU's queue: there must be none
    torch.manual_seed(0)
    model = MoCo(tiny_encoder, **{"dim": 16, "K": 32, "m": 0.9, **kw})
    im_q, im_k = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    with count_host_syncs(strict=True):
        for _ in range(3):  # the empty queue fills and wraps around
            logits, labels = model(im_q, im_k, index=torch.arange(8))
            model.loss(logits, labels).backward()
    assert int(model.queue_count) == 3 and logits.shape[1] == 1 + model.K  # the empty queue is full by now


@pytest.mark.parametrize("K", [2.5, "8", None])
def test_K_must_be_integral(tiny_encoder, K):
    with pytest.raises(ValueError, match="K must be a positive integer"):
        MoCo(tiny_encoder, dim=16, K=K)
    assert MoCo(tiny_encoder, dim=16, K=8.0).K == 8
    with pytest.raises(ValueError, match="bn_splits"):
        MoCo(tiny_encoder, dim=16, K=8, shuffle_bn="split", bn_splits=2.5)
    with pytest.raises(ValueError, match="K"):
        MemoryBankModel(tiny_encoder, num_samples=10, dim=16, K=K)


def test_encoder_output_must_match_dim(tiny_encoder):
    model = MoCo(lambda num_classes: tiny_encoder(12), dim=16, K=8)
    with pytest.raises(ValueError, match=r"\(4, 12\).*\(4, 16\)"):
        model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))


@pytest.mark.parametrize("shape_k", [(6, 3, 16, 16), (4, 3, 12, 12)])
def test_query_and_key_batches_must_match(tiny_encoder, shape_k):
    model = MoCo(tiny_encoder, dim=16, K=8)
    before = model.queue.clone()
    with pytest.raises(ValueError, match=re.escape(f"im_q (4, 3, 16, 16) and im_k {tuple(shape_k)}")):
        model(torch.randn(4, 3, 16, 16), torch.randn(*shape_k))
    with pytest.raises(ValueError, match=r"index must have shape \(4,\)"):
        model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), index=torch.arange(5))
    assert torch.equal(model.queue, before) and int(model.queue_ptr) == 0  # nothing ran


def test_contrast_is_fp32_under_bf16_autocast(tiny_encoder):
    torch.manual_seed(0)
    model = MoCo(tiny_encoder, dim=16, K=64, T=0.1)
    seen = {}
    model.encoder_q.register_forward_hook(lambda mod, inp, out: seen.__setitem__("q", out))
    model.encoder_k.register_forward_hook(lambda mod, inp, out: seen.__setitem__("k", out))
    negatives = model.queue.clone()
    im_q, im_k = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, labels = model(im_q, im_k)
    assert seen["q"].dtype == torch.bfloat16 and logits.dtype == torch.float32
    q = F.normalize(seen["q"].float(), dim=1)  # the same q, the contrast in fp32
    k = F.normalize(seen["k"].float(), dim=1)
    expected = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives], dim=1) / 0.1
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.queue[:, :8], k.t())  # the fp32 keys were enqueued
    model.loss(logits, labels).backward()
    assert model.encoder_q.fc.weight.grad is not None


def test_logits_keep_their_negatives_after_the_enqueue(tiny_encoder):
    # the enqueue overwrites the queue in place after the logits: backward must use the old keys
    torch.manual_seed(0)
    model = MoCo(tiny_encoder, dim=16, K=8, shuffle_bn="off").double()
    old = model.queue.clone()
    im_q, im_k = torch.randn(8, 3, 16, 16).double(), torch.randn(8, 3, 16, 16).double()
    logits, _ = model(im_q, im_k)
    assert not torch.equal(model.queue, old)
    (grad,) = torch.autograd.grad(logits[:, 1:].sum(), model.encoder_q.fc.bias)  # through l_neg only
    k = torch.zeros(8, 16, dtype=torch.double)
    ref = model.contrast(model.encoder_q(im_q), k, old)
    (grad_ref,) = torch.autograd.grad(ref[:, 1:].sum(), model.encoder_q.fc.bias)
    torch.testing.assert_close(grad, grad_ref)
    torch.testing.assert_close(logits[:, 1:], ref[:, 1:])
    with torch.no_grad():  # without gradients the queue is not copied, and the logits are the same
        model.queue.copy_(old)
        torch.testing.assert_close(model(im_q, im_k)[0][:, 1:], ref[:, 1:].detach())

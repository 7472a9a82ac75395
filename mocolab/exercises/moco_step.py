"""Checkers of notebooks 05 to 07: the momentum update, the shuffled keys, and the whole MoCo step."""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders import ConvNet
from ..losses import infonce_logits
from ..moco import MoCo
from ..momentum import freeze, momentum_update as _momentum_update
from ..shuffle_bn import SplitBatchNorm, batch_shuffle, batch_unshuffle
from .core import (
    _all_close,
    _all_equal,
    _call,
    _close,
    _diagnose,
    _error_text,
    _Failure,
    _first_param_diff,
    _float_buffers,
    _fmt,
    _params,
    _where,
)
from .losses import _infonce_variants
from .negatives import _check_queue_state, _lib_enqueue, _queue_error_classifier


# ======================================================================= 05 momentum update
def _small_net(gen: torch.Generator) -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        for b in net.buffers():
            if b.is_floating_point():
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
    return net


def _check_momentum_update(fn) -> str:
    gen = torch.Generator().manual_seed(5)
    for m in (0.9, 0.3, 0.0, 1.0, 0.999):
        encoder_q, encoder_k = _small_net(gen), freeze(_small_net(gen))  # as in MoCo
        case = f"m = {m:g}, encoders Linear(3, 5) → BatchNorm1d(5) → ReLU → Linear(5, 2)"
        k0, q0 = _params(encoder_k), _params(encoder_q)
        kb0, qb0 = _float_buffers(encoder_k), _float_buffers(encoder_q)
        inputs = f"θk[0] = {_fmt(k0[0])}, θq[0] = {_fmt(q0[0])}, m = {m:g}"
        ids = [(id(p), p.data_ptr()) for p in encoder_k.parameters()]
        ek, eq = copy.deepcopy(encoder_k), copy.deepcopy(encoder_q)
        _momentum_update(ek, eq, m)
        expected = _params(ek)
        _call(fn, case, inputs, encoder_k, encoder_q, m,
              classify=lambda err: "query_updated" if "leaf Variable" in str(err) else None)
        if not (_all_equal(_params(encoder_q), q0) and _all_equal(_float_buffers(encoder_q), qb0)):
            exp_text, got_text = _first_param_diff(encoder_q, q0)
            raise _Failure(case, "query_updated", inputs=inputs, expected=f"θq unchanged: {exp_text}",
                           got=got_text or "a buffer of the query encoder changed")
        if [(id(p), p.data_ptr()) for p in encoder_k.parameters()] != ids:
            raise _Failure(case, "not_in_place", inputs=inputs, expected="the same parameter tensors, updated",
                           got="new tensors in encoder_k")
        if any(p.requires_grad or p.grad_fn is not None for p in encoder_k.parameters()):
            raise _Failure(case, "momentum_not_no_grad", inputs=inputs, expected="θk without gradient history",
                           got="parameters of encoder_k that require grad")
        got = _params(encoder_k)
        if not _all_close(got, expected):
            reversed_ = [(1 - m) * k + m * q for k, q in zip(k0, q0)]
            mistake = ("momentum_reversed" if _all_close(got, reversed_) else
                       "momentum_missing" if _all_equal(got, k0) else None)
            exp_text, got_text = _first_param_diff(encoder_k, expected)
            raise _Failure(case, mistake, inputs=inputs, expected=exp_text, got=got_text,
                           hint="" if mistake else "Every parameter of the key encoder: θk ← m·θk + (1 − m)·θq.")
        if not _all_equal(_float_buffers(encoder_k), kb0) and m != 1.0:
            raise _Failure(case, "momentum_buffers", inputs=inputs, expected="BN running statistics of encoder_k "
                           "unchanged", got="running statistics averaged")
    return ("every parameter after updates with m = 0.9, 0.3, 0, 1 and 0.999 against mocolab.momentum_update; the "
            "update is in place (same tensors), without gradient history, leaves θq and the BN statistics alone.")


# ======================================================================= 06 batch shuffle
def _lib_shuffled_keys(encoder_k, im_k):
    """The library's keys with the batch shuffled (:func:`mocolab.batch_shuffle` / :func:`mocolab.batch_unshuffle`)."""
    with torch.no_grad():
        im, idx_unshuffle = batch_shuffle(im_k)
        k = F.normalize(encoder_k(im), dim=1)
        return batch_unshuffle(k, idx_unshuffle)


class _Spy(nn.Module):
    """An encoder that remembers the batches it was given."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.net(x)


def _permutation(seen: torch.Tensor, images: torch.Tensor) -> torch.Tensor | None:
    """The permutation p with seen == images[p], or None if seen is not a reordering of images."""
    if seen.shape != images.shape:
        return None
    match = (seen.flatten(1)[:, None, :] == images.flatten(1)[None, :, :]).all(dim=-1)  # (N, N)
    if not bool((match.sum(dim=1) == 1).all()) or not bool((match.sum(dim=0) == 1).all()):
        return None
    return match.float().argmax(dim=1)


def _check_shuffled_keys(fn) -> str:
    gen = torch.Generator().manual_seed(6)
    C = 3
    for n in (8, 6, 4, 8):
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SplitBatchNorm(4, num_splits=2), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, C))
        encoder_k = _Spy(net).train()
        im_k = torch.randn(n, 3, 5, 5, generator=gen)
        case = f"N = {n} images (3×5×5), one process, key encoder with 2 BN groups, C = {C}"
        inputs = f"im_k {_fmt(im_k)}"
        k = _call(fn, case, inputs, encoder_k, im_k.clone())
        if len(encoder_k.seen) != 1:
            raise _Failure(case, "one_encoder_call", inputs=inputs, expected="one call of encoder_k on the batch",
                           got=f"{len(encoder_k.seen)} calls")
        perm = _permutation(encoder_k.seen[0], im_k)
        if perm is None:
            raise _Failure(case, inputs=inputs, expected=f"encoder_k called on the {n} images of im_k, reordered",
                           got=f"encoder_k called on {_fmt(encoder_k.seen[0])}",
                           hint="Give the key encoder the same images, in shuffled order: im_k[idx_shuffle].")
        if n >= 6 and torch.equal(perm, torch.arange(n)):
            raise _Failure(case, "not_shuffled", inputs=inputs, expected="the batch in a shuffled order",
                           got="the batch in its original order")
        with torch.no_grad():
            k_shuf_raw = net(im_k[perm])
            k_shuf = F.normalize(k_shuf_raw, dim=1)
            expected = batch_unshuffle(k_shuf, torch.argsort(perm))
        if not isinstance(k, torch.Tensor) or k.shape != expected.shape:
            raise _Failure(case, "wrong_return", inputs=inputs, expected=f"keys of shape {tuple(expected.shape)}",
                           got=_fmt(k))
        if not _close(k, expected):
            unshuffle = torch.argsort(perm)
            variants = [
                ("shuffle_not_undone", k_shuf),
                ("unshuffle_with_shuffle_index", k_shuf[perm]),
                ("not_normalised", k_shuf_raw[unshuffle]),
                ("not_normalised", k_shuf_raw),
                ("normalised_wrong_dim", F.normalize(k_shuf_raw, dim=0)[unshuffle]),
            ]
            mistake = _diagnose(k, variants)
            exp_text, got_text = _where(k, expected)
            raise _Failure(case, mistake, inputs=f"{inputs}; shuffle used: {perm.tolist()}",
                           expected=f"keys {exp_text}", got=f"keys {got_text}",
                           hint="" if mistake else "Keys: shuffle, encode, L2-normalise (dim=1), then unshuffle with "
                                                   "argsort(idx_shuffle).")
        if k.requires_grad:
            raise _Failure(case, "key_not_detached", inputs=inputs, expected="keys without gradient",
                           got="keys that require grad")
    return ("the permutation the encoder saw and the keys on 4 batches (N = 4 to 8, one process, 2 BN groups): "
            "shuffled, encoded once, L2-normalised, back in the original order, without gradient.")


# ======================================================================= 07 the MoCo step
def _lib_moco_step(encoder_q, encoder_k, queue, ptr, im_q, im_k, m, T):
    """One MoCo step assembled from the library's pieces; returns (logits, labels, new ptr)."""
    _momentum_update(encoder_k, encoder_q, m)
    k = _lib_shuffled_keys(encoder_k, im_k)
    q = F.normalize(encoder_q(im_q), dim=1)
    logits, labels = infonce_logits(q, k, queue.clone().detach(), T)
    return logits, labels, _lib_enqueue(queue, ptr, k)


def _moco_error_classifier(err):
    text = str(err)
    if "leaf Variable" in text:
        return "momentum_not_no_grad"
    return None


def _check_moco_step(fn) -> str:
    dim, K, n, m, T, steps, size = 8, 20, 6, 0.9, 0.2, 5, 8
    torch.default_generator.manual_seed(7)
    moco = MoCo(partial(ConvNet, width=4), dim=dim, K=K, m=m, T=T, shuffle_bn="off").train()
    encoder_q, encoder_k = copy.deepcopy(moco.encoder_q), copy.deepcopy(moco.encoder_k)
    for p in encoder_k.parameters():
        p.requires_grad = True  # so that a gradient reaching the key encoder shows
    queue, ptr = moco.queue.detach().clone(), 0
    opt_o = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.5)
    opt_l = torch.optim.SGD(encoder_q.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(8)
    for step in range(1, steps + 1):
        im_q, im_k = torch.randn(n, 3, size, size, generator=gen), torch.randn(n, 3, size, size, generator=gen)
        wraps = " (the enqueue wraps around)" if ptr + n > K else ""
        case = (f"step {step} of {steps}: ConvNet(width=4) encoders, N = {n} images of {size}×{size}, dim = {dim}, "
                f"K = {K}, m = {m:g}, T = {T:g}, ptr = {ptr}{wraps}")
        inputs = f"im_q {_fmt(im_q)}, im_k {_fmt(im_k)}, ptr = {ptr}"
        q_before, k_before = _params(encoder_q), _params(encoder_k)
        k_snapshot = copy.deepcopy(encoder_k)
        ids = [(id(p), p.data_ptr()) for p in encoder_k.parameters()]
        queue_before = queue.clone()
        out = _call(fn, case, inputs, encoder_q, encoder_k, queue, ptr, im_q.clone(), im_k.clone(), m, T,
                    classify=lambda err: _moco_error_classifier(err) or _queue_error_classifier(ptr, n, K, False)(err))
        exp_logits, _ = moco(im_q, im_k)
        exp_logits_d = exp_logits.detach()
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise _Failure(case, "wrong_return", inputs=inputs, expected="a tuple (logits, labels, new ptr)",
                           got=_fmt(out))
        logits, labels, got_ptr = out
        # the key encoder
        if not _all_equal(_params(encoder_q), q_before):
            exp_text, got_text = _first_param_diff(encoder_q, q_before)
            raise _Failure(case, "query_updated", inputs=inputs, expected=f"θq unchanged by the step: {exp_text}",
                           got=got_text)
        if [(id(p), p.data_ptr()) for p in encoder_k.parameters()] != ids:
            raise _Failure(case, "not_in_place", inputs=inputs, expected="the same parameter tensors in encoder_k",
                           got="new tensors")
        exp_k = _params(moco.encoder_k)
        if not _all_close(_params(encoder_k), exp_k, atol=1e-5):
            got_k = _params(encoder_k)
            reversed_ = [(1 - m) * a + m * b for a, b in zip(k_before, q_before)]
            mistake = ("momentum_reversed" if _all_close(got_k, reversed_, atol=1e-5)
                       else "momentum_missing" if _all_equal(got_k, k_before) else None)
            exp_text, got_text = _first_param_diff(encoder_k, exp_k)
            raise _Failure(case, mistake, inputs=inputs, expected=f"key encoder {exp_text}",
                           got=f"key encoder {got_text}",
                           hint="" if mistake else "Start the step with θk ← m·θk + (1 − m)·θq.")
        # the logits
        if not isinstance(logits, torch.Tensor) or logits.shape != exp_logits_d.shape:
            raise _Failure(case, inputs=inputs, expected=f"logits of shape (N, 1 + K) = {tuple(exp_logits_d.shape)}",
                           got=f"logits {_fmt(logits)}",
                           hint="logits = cat([l_pos, l_neg], dim=1): N rows, the positive and then the K keys of "
                                "the queue.")
        if not _close(logits, exp_logits_d, atol=1e-4):
            with torch.no_grad():
                q_raw = copy.deepcopy(encoder_q)(im_q)
                k_raw = copy.deepcopy(moco.encoder_k)(im_k)
                qn, kn = F.normalize(q_raw, dim=1), F.normalize(k_raw, dim=1)
                variants = _infonce_variants(q_raw, k_raw, queue_before, T, exp_logits_d)
                for name, k_other in (("keys_before_momentum", k_snapshot), ("keys_from_query_encoder", encoder_q)):
                    k_alt = F.normalize(copy.deepcopy(k_other)(im_k), dim=1)
                    variants.append((name, torch.cat([(qn * k_alt).sum(1, keepdim=True), qn @ queue_before], 1) / T))
                variants.append(("enqueue_before_logits",
                                 torch.cat([(qn * kn).sum(1, keepdim=True), qn @ moco.queue], 1) / T))
            mistake = _diagnose(logits, variants, atol=1e-4)
            exp_text, got_text = _where(logits, exp_logits_d, atol=1e-4)
            raise _Failure(case, mistake, inputs=inputs, expected=f"logits {exp_text}", got=f"logits {got_text}",
                           hint="" if mistake else "logits = cat([q·k, q·queue], dim=1) / T with q from encoder_q "
                                                   "and k from the updated encoder_k, both normalised.")
        if (not isinstance(labels, torch.Tensor) or labels.shape != (n,) or labels.dtype != torch.long
                or bool((labels != 0).any())):
            raise _Failure(case, "labels_not_zero", inputs=inputs, expected=_fmt(torch.zeros(n, dtype=torch.long)),
                           got=_fmt(labels))
        # the gradients
        loss = F.cross_entropy(logits, labels)
        opt_l.zero_grad()
        for p in encoder_k.parameters():
            p.grad = None
        try:
            loss.backward()
        except RuntimeError as err:
            mistake = ("queue_not_cloned" if "inplace" in str(err) or "in-place" in str(err)
                       else "queries_without_grad" if "does not require grad" in str(err) else None)
            raise _Failure(case, mistake, inputs=inputs, expected="loss.backward() to run",
                           got=f"raised {_error_text(err)}") from None
        if any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in encoder_k.parameters()):
            raise _Failure(case, "key_not_detached", inputs=inputs, expected="no gradient in encoder_k",
                           got="encoder_k's parameters received gradients from the loss")
        if all(p.grad is None for p in encoder_q.parameters()):
            raise _Failure(case, "queries_without_grad", inputs=inputs, expected="gradients in encoder_q",
                           got="no gradient reached encoder_q")
        # the queue
        ptr = _check_queue_state(case, inputs, queue, got_ptr, moco.queue, int(moco.queue_ptr), queue_before, ptr,
                                 F.normalize(copy.deepcopy(moco.encoder_k)(im_k), dim=1).detach(), atol=1e-5)
        # one optimizer step on both, so that θq moves and the momentum matters
        opt_o.zero_grad()
        moco.loss(exp_logits, torch.zeros(n, dtype=torch.long)).backward()
        opt_o.step()
        opt_l.step()
    return (f"logits, labels, key encoder, queue and pointer after each of {steps} training steps against "
            f"mocolab.MoCo (K = {K} not divisible by N = {n}, so the queue wraps); the loss backpropagates to the "
            "query encoder and not to the key encoder.")

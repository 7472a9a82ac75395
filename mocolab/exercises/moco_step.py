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
    DATA_NOTE,
    Checked,
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
    _grad_mismatches,
    _grads_close,
    _labels_ok,
    _mode_text,
    _modes,
    _named,
    _params,
    _storage,
    _where,
)
from .losses import GRAD_MISTAKES, _cut_loss, _infonce_variants
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


def _check_key_storage(case: str, inputs: str, encoder_k: nn.Module, encoder_q: nn.Module, before) -> bool:
    """Fail if encoder_k's Parameter objects were replaced, or share memory with encoder_q's; True when their
    data was reallocated (``p.data = …``: correct, as in the official code, but it costs a tensor per step)."""
    ids, ptrs = _storage(encoder_k)
    if ids != before[0]:
        raise _Failure(case, "parameters_replaced", inputs=inputs, got="new Parameter objects in encoder_k",
                       expected="the same Parameter objects, with new values")
    if set(ptrs) & set(_storage(encoder_q)[1]):
        raise _Failure(case, "shares_storage", inputs=inputs, expected="θk in its own memory",
                       got="parameters of encoder_k that share memory with encoder_q's")
    return ptrs != before[1]


def _check_modes(case: str, inputs: str, encoders: dict[str, nn.Module], before: dict[str, list[bool]]) -> None:
    """Fail if a function left an encoder's BatchNorm or dropout in another train/eval mode than it found them."""
    for name, module in encoders.items():
        if _modes(module) != before[name]:
            raise _Failure(case, "mode_changed", inputs=inputs, expected=f"{name} left in {_mode_text(before[name])}",
                           got=f"{name} in {_mode_text(_modes(module))}")


def _momentum_mistake(got, k0, q0, expected, m, atol=1e-6) -> str | None:
    reversed_ = [(1 - m) * k + m * q for k, q in zip(k0, q0)]
    same = lambda a, b: _all_close(a, b, atol=atol)  # noqa: E731
    return _named(got, [("momentum_reversed", reversed_), ("momentum_missing", k0)], expected, same)


def _check_momentum_update(fn) -> str:
    gen = torch.Generator().manual_seed(5)
    reallocated = False
    for m in (0.9, 0.3, 0.0, 1.0, 0.999):
        encoder_q, encoder_k = _small_net(gen), freeze(_small_net(gen))  # as in MoCo
        case = f"m = {m:g}, encoders Linear(3, 5) → BatchNorm1d(5) → ReLU → Linear(5, 2)"
        k0, q0 = _params(encoder_k), _params(encoder_q)
        kb0, qb0 = _float_buffers(encoder_k), _float_buffers(encoder_q)
        inputs = f"θk[0] = {_fmt(k0[0])}, θq[0] = {_fmt(q0[0])}, m = {m:g}"
        storage, modes = _storage(encoder_k), {"encoder_k": _modes(encoder_k), "encoder_q": _modes(encoder_q)}
        ek, eq = copy.deepcopy(encoder_k), copy.deepcopy(encoder_q)
        _momentum_update(ek, eq, m)
        expected = _params(ek)
        _call(fn, case, inputs, encoder_k, encoder_q, m,
              classify=lambda err: "query_updated" if "leaf Variable" in str(err) else None)
        if not (_all_equal(_params(encoder_q), q0) and _all_equal(_float_buffers(encoder_q), qb0)):
            exp_text, got_text = _first_param_diff(encoder_q, q0)
            raise _Failure(case, "query_updated", inputs=inputs, expected=f"θq unchanged: {exp_text}",
                           got=got_text or "a buffer of the query encoder changed")
        reallocated |= _check_key_storage(case, inputs, encoder_k, encoder_q, storage)
        if any(p.requires_grad or p.grad_fn is not None for p in encoder_k.parameters()):
            raise _Failure(case, "momentum_not_no_grad", inputs=inputs, expected="θk without gradient history",
                           got="parameters of encoder_k that require grad")
        got = _params(encoder_k)
        if not _all_close(got, expected):
            mistake = _momentum_mistake(got, k0, q0, expected, m)
            exp_text, got_text = _first_param_diff(encoder_k, expected)
            raise _Failure(case, mistake, inputs=inputs, expected=exp_text, got=got_text,
                           hint="" if mistake else "Every parameter of the key encoder: θk ← m·θk + (1 − m)·θq.")
        if not _all_equal(_float_buffers(encoder_k), kb0) and m != 1.0:
            raise _Failure(case, "momentum_buffers", inputs=inputs, expected="BN running statistics of encoder_k "
                           "unchanged", got="running statistics averaged")
        _check_modes(case, inputs, {"encoder_k": encoder_k, "encoder_q": encoder_q}, modes)
    return Checked("every parameter after updates with m = 0.9, 0.3, 0, 1 and 0.999 against mocolab.momentum_update; "
                   "the update keeps encoder_k's parameters, has no gradient history, leaves θq and the BN statistics "
                   "alone.", DATA_NOTE if reallocated else "")


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


def _key_net(C: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SplitBatchNorm(4, num_splits=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, C))


@torch.no_grad()
def _keys_of(net: nn.Module, images: torch.Tensor, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw, unit) outputs of a copy of ``net`` in train or eval mode, so that ``net`` itself is left alone."""
    raw = copy.deepcopy(net).train(train)(images)
    return raw, F.normalize(raw, dim=1)


def _check_shuffled_keys(fn) -> str:
    gen = torch.Generator().manual_seed(6)
    C = 3
    for n in (8, 6, 4, 8):
        net = _key_net(C)
        encoder_k = _Spy(net).train()
        net_before, modes = copy.deepcopy(net), {"encoder_k": _modes(encoder_k)}
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
        k_shuf_raw, k_shuf = _keys_of(net_before, im_k[perm])
        unshuffle = torch.argsort(perm)
        expected = k_shuf[unshuffle]
        if not isinstance(k, torch.Tensor) or k.shape != expected.shape:
            raise _Failure(case, "wrong_return", inputs=inputs, expected=f"keys of shape {tuple(expected.shape)}",
                           got=_fmt(k))
        if not _close(k, expected):
            k_eval = _keys_of(net_before, im_k, train=False)[1]  # eval mode: per sample, in the original order
            variants = [
                ("shuffle_not_undone", k_shuf),
                ("unshuffle_with_shuffle_index", k_shuf[perm]),
                ("not_normalised", k_shuf_raw[unshuffle]),
                ("not_normalised", k_shuf_raw),
                ("normalised_wrong_dim", F.normalize(k_shuf_raw, dim=0)[unshuffle]),
                ("key_encoder_eval", k_eval),
                ("key_encoder_eval", k_eval[perm]),
            ]
            mistake = _diagnose(k, variants, expected)
            exp_text, got_text = _where(k, expected)
            raise _Failure(case, mistake, inputs=f"{inputs}; shuffle used: {perm.tolist()}",
                           expected=f"keys {exp_text}", got=f"keys {got_text}",
                           hint="" if mistake else "Keys: shuffle, encode, L2-normalise (dim=1), then unshuffle with "
                                                   "argsort(idx_shuffle).")
        if k.requires_grad:
            raise _Failure(case, "key_not_detached", inputs=inputs, expected="keys without gradient",
                           got="keys that require grad")
        _check_modes(case, inputs, {"encoder_k": encoder_k}, modes)
    return ("the permutation the encoder saw and the keys on 4 batches (N = 4 to 8, one process, 2 BN groups): "
            "shuffled, encoded once in train mode, L2-normalised, back in the original order, without gradient; "
            "the encoder left in train mode.")


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


@torch.no_grad()
def _step_logit_variants(encoder_q, encoder_k_before, moco, im_q, im_k, queue_before, m, T, expected):
    """The logits of the typical mistakes of a step, each as (mistake, tensor)."""
    q_raw = copy.deepcopy(encoder_q)(im_q)
    k_raw = _keys_of(moco.encoder_k, im_k)[0]
    qn, kn = F.normalize(q_raw, dim=1), F.normalize(k_raw, dim=1)

    def logits(k, negatives=queue_before):
        return torch.cat([(qn * k).sum(1, keepdim=True), qn @ negatives], 1) / T  # (N, 1+K)

    k_updated = copy.deepcopy(encoder_k_before)  # θk after the update, BN statistics from before the step
    _momentum_update(k_updated, encoder_q, m)
    variants = _infonce_variants(q_raw, k_raw, queue_before, T, expected)
    variants += [("keys_before_momentum", logits(_keys_of(encoder_k_before, im_k)[1])),
                 ("keys_from_query_encoder", logits(_keys_of(encoder_q, im_k)[1])),
                 ("key_encoder_eval", logits(_keys_of(k_updated, im_k, train=False)[1])),
                 ("enqueue_before_logits", logits(kn, moco.queue))]
    return variants


def _check_step_key_encoder(case, inputs, encoder_q, encoder_k, moco, q_before, k_before, storage, m) -> bool:
    """θq untouched, θk as the oracle's, the same Parameter objects; True when their data was reallocated."""
    if not _all_equal(_params(encoder_q), q_before):
        exp_text, got_text = _first_param_diff(encoder_q, q_before)
        raise _Failure(case, "query_updated", inputs=inputs, expected=f"θq unchanged by the step: {exp_text}",
                       got=got_text)
    reallocated = _check_key_storage(case, inputs, encoder_k, encoder_q, storage)
    exp_k = _params(moco.encoder_k)
    if not _all_close(_params(encoder_k), exp_k, atol=1e-5):
        mistake = _momentum_mistake(_params(encoder_k), k_before, q_before, exp_k, m, atol=1e-5)
        exp_text, got_text = _first_param_diff(encoder_k, exp_k)
        raise _Failure(case, mistake, inputs=inputs, expected=f"key encoder {exp_text}", got=f"key encoder {got_text}",
                       hint="" if mistake else "Start the step with θk ← m·θk + (1 − m)·θq.")
    return reallocated


def _check_step_gradients(case, inputs, logits, labels, encoder_q, encoder_k, moco, exp_logits, k, queue_before, T,
                          im_q):
    """The loss of the step's logits reaches θq as the oracle's does, and never θk."""
    for p in [*encoder_q.parameters(), *encoder_k.parameters(), *moco.encoder_q.parameters()]:
        p.grad = None
    try:
        F.cross_entropy(logits, labels).backward()
    except RuntimeError as err:
        mistake = ("queue_not_cloned" if "inplace" in str(err) or "in-place" in str(err)
                   else "queries_without_grad" if "does not require grad" in str(err) else None)
        raise _Failure(case, mistake, inputs=inputs, expected="loss.backward() to run",
                       got=f"raised {_error_text(err)}") from None
    if any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in encoder_k.parameters()):
        raise _Failure(case, "key_not_detached", inputs=inputs, expected="no gradient in encoder_k",
                       got="encoder_k's parameters received gradients from the loss")
    got = [p.grad for p in encoder_q.parameters()]
    if all(g is None for g in got):
        raise _Failure(case, "queries_without_grad", inputs=inputs, expected="gradients in encoder_q",
                       got="no gradient reached encoder_q")
    moco.loss(exp_logits, torch.zeros(len(labels), dtype=torch.long)).backward()
    expected = [p.grad for p in moco.encoder_q.parameters()]
    if not _grads_close(got, expected):
        def variant(cut_pos, cut_neg):
            enc = copy.deepcopy(encoder_q)
            loss = _cut_loss(F.normalize(enc(im_q), dim=1), k, queue_before, T, cut_pos, cut_neg)
            return list(torch.autograd.grad(loss, list(enc.parameters()), allow_unused=True))
        mistake = _named(got, [(name, partial(variant, pos, neg)) for name, pos, neg in GRAD_MISTAKES], expected,
                         _grads_close)
        i = _grad_mismatches(got, expected)[0]
        name = [name for name, _ in encoder_q.named_parameters()][i]
        raise _Failure(case, mistake, inputs=inputs, expected=f"∂L/∂{name} {_fmt(expected[i])}",
                       got=f"∂L/∂{name} {_fmt(got[i])}",
                       hint="" if mistake else "The logits are right but their gradient is not: q must reach the "
                                               "loss with its gradient through l_pos and l_neg alike.")


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
    reallocated = False
    for step in range(1, steps + 1):
        im_q, im_k = torch.randn(n, 3, size, size, generator=gen), torch.randn(n, 3, size, size, generator=gen)
        wraps = " (the enqueue wraps around)" if ptr + n > K else ""
        case = (f"step {step} of {steps}: ConvNet(width=4) encoders, N = {n} images of {size}×{size}, dim = {dim}, "
                f"K = {K}, m = {m:g}, T = {T:g}, ptr = {ptr}{wraps}")
        inputs = f"im_q {_fmt(im_q)}, im_k {_fmt(im_k)}, ptr = {ptr}"
        q_before, k_before, k_snapshot = _params(encoder_q), _params(encoder_k), copy.deepcopy(encoder_k)
        storage, modes = _storage(encoder_k), {"encoder_k": _modes(encoder_k), "encoder_q": _modes(encoder_q)}
        queue_before = queue.clone()
        out = _call(fn, case, inputs, encoder_q, encoder_k, queue, ptr, im_q.clone(), im_k.clone(), m, T,
                    classify=lambda err: _moco_error_classifier(err) or _queue_error_classifier(ptr, n, K, False)(err))
        exp_logits, _ = moco(im_q, im_k)
        exp_logits_d = exp_logits.detach()
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise _Failure(case, "wrong_return", inputs=inputs, expected="a tuple (logits, labels, new ptr)",
                           got=_fmt(out))
        logits, labels, got_ptr = out
        reallocated |= _check_step_key_encoder(case, inputs, encoder_q, encoder_k, moco, q_before, k_before, storage,
                                               m)
        if not isinstance(logits, torch.Tensor) or logits.shape != exp_logits_d.shape:
            raise _Failure(case, inputs=inputs, expected=f"logits of shape (N, 1 + K) = {tuple(exp_logits_d.shape)}",
                           got=f"logits {_fmt(logits)}",
                           hint="logits = cat([l_pos, l_neg], dim=1): N rows, the positive and then the K keys of "
                                "the queue.")
        if not _close(logits, exp_logits_d, atol=1e-4):
            variants = _step_logit_variants(encoder_q, k_snapshot, moco, im_q, im_k, queue_before, m, T, exp_logits_d)
            mistake = _diagnose(logits, variants, exp_logits_d, atol=1e-4)
            exp_text, got_text = _where(logits, exp_logits_d, atol=1e-4)
            raise _Failure(case, mistake, inputs=inputs, expected=f"logits {exp_text}", got=f"logits {got_text}",
                           hint="" if mistake else "logits = cat([q·k, q·queue], dim=1) / T with q from encoder_q "
                                                   "and k from the updated encoder_k, both normalised.")
        _labels_ok(case, inputs, labels, n, exp_logits_d)
        k = _keys_of(moco.encoder_k, im_k)[1]
        _check_step_gradients(case, inputs, logits, labels, encoder_q, encoder_k, moco, exp_logits, k, queue_before,
                              T, im_q)
        _check_modes(case, inputs, {"encoder_k": encoder_k, "encoder_q": encoder_q}, modes)
        ptr = _check_queue_state(case, inputs, queue, got_ptr, moco.queue, int(moco.queue_ptr), queue_before, ptr, k,
                                 atol=1e-5)
        opt_o.step()  # one SGD step on both, so that θq moves and the momentum matters
        opt_l.step()
    return Checked(f"logits, labels, key encoder, queue and pointer after each of {steps} training steps against "
                   f"mocolab.MoCo (K = {K} not divisible by N = {n}, so the queue wraps); the loss's gradient reaches "
                   "the query encoder as MoCo's does and never the key encoder; both encoders keep their train mode.",
                   DATA_NOTE if reallocated else "")

"""Checkers of notebooks 01 and 02: the margin contrastive loss, InfoNCE, and the chance loss."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from ..losses import infonce_logits, margin_contrastive_loss
from .core import _call, _close, _diagnose, _error_text, _Failure, _fmt, _labels_ok, _unit, _where


# ======================================================================= 01 margin loss
def _lib_margin_loss(x1, x2, y, margin):
    """The library's margin contrastive loss (:func:`mocolab.margin_contrastive_loss`)."""
    return margin_contrastive_loss(x1, x2, y, margin=margin)


def _check_margin_loss(fn) -> str:
    gen = torch.Generator().manual_seed(1)
    cases = [(4, 3, 1.0, [0, 1, 0, 1]), (1, 2, 0.5, [1]), (6, 5, 2.0, [0] * 6), (6, 5, 0.7, [1] * 6),
             (8, 16, 1.5, [1, 0, 0, 1, 1, 0, 1, 0])]
    for n, c, margin, labels in cases:
        x1 = torch.randn(n, c, generator=gen)
        d = 0.1 + torch.rand(n, generator=gen) * 2 * margin  # distances on both sides of the margin
        x2 = x1 + d[:, None] * _unit(n, c, generator=gen)
        y = torch.tensor(labels)
        kind = "all similar" if not any(labels) else "all dissimilar" if all(labels) else "mixed labels"
        case = f"N = {n} pairs of C = {c}, margin = {margin:g}, {kind}"
        inputs = f"x1 {_fmt(x1)}, x2 {_fmt(x2)}, y = {labels}, margin = {margin:g}; D = {_fmt(d)}"
        a1, a2 = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        got = _call(fn, case, inputs, a1, a2, y.clone(), margin)
        o1, o2 = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        expected = margin_contrastive_loss(o1, o2, y, margin=margin)
        expected.backward()
        if not isinstance(got, torch.Tensor):
            raise _Failure(case, "not_a_tensor", inputs=inputs, expected=_fmt(expected), got=_fmt(got))
        if got.numel() != 1:
            raise _Failure(case, inputs=inputs, expected=f"one number, {_fmt(expected)}", got=_fmt(got),
                           hint="Average the per-pair losses into one number: .mean() over the N pairs.")
        got = got.reshape(())
        if not _close(got, expected.detach()):
            yf = y.float()
            D = (x1 - x2).norm(dim=1)
            sim = (1 - yf) * 0.5 * D**2
            variants = [
                ("labels_swapped", lambda: margin_contrastive_loss(x1, x2, 1 - y, margin=margin)),
                ("labels_ignored", lambda: margin_contrastive_loss(x1, x2, torch.zeros_like(y), margin=margin)),
                ("labels_ignored", lambda: margin_contrastive_loss(x1, x2, torch.ones_like(y), margin=margin)),
                ("missing_half", 2 * expected.detach()),
                ("loss_not_mean", n * expected.detach() if n > 1 else None),
                ("hinge_not_clamped", (sim + yf * 0.5 * (margin - D) ** 2).mean()),
                ("hinge_on_squared_distance", (sim + yf * 0.5 * (margin - D**2).clamp_min(0) ** 2).mean()),
                ("hinge_not_squared", (sim + yf * 0.5 * (margin - D).clamp_min(0)).mean()),
                ("distance_not_squared", ((1 - yf) * 0.5 * D + yf * 0.5 * (margin - D).clamp_min(0) ** 2).mean()),
                ("margin_ignored", margin_contrastive_loss(x1, x2, y, margin=1.0) if margin != 1.0 else None),
            ]
            mistake = _diagnose(got, variants, expected.detach())
            raise _Failure(case, mistake, inputs=inputs, expected=_fmt(expected), got=_fmt(got),
                           hint="" if mistake else "Write L = (1 − Y)·½·D² + Y·½·max(0, margin − D)² with "
                                                   "D = ‖x1 − x2‖ per pair, then average over the pairs.")
        if not got.requires_grad:
            raise _Failure(case, "detached", inputs=inputs, expected="a loss that requires grad",
                           got=f"{_fmt(got)} with requires_grad = False")
        try:
            g1, g2 = torch.autograd.grad(got, (a1, a2), allow_unused=True)
        except RuntimeError as err:
            raise _Failure(case, "detached", inputs=inputs, got=f"backward raised {_error_text(err)}") from None
        if g1 is None or g2 is None or not (_close(g1, o1.grad) and _close(g2, o2.grad)):
            exp_text, got_text = _where(g1 if g1 is not None else torch.zeros_like(x1), o1.grad)
            raise _Failure(case, "detached", inputs=inputs, expected=f"∂L/∂x1 {exp_text}", got=f"∂L/∂x1 {got_text}")
    return ("value and gradient on 5 cases: N = 1 to 8 pairs, C = 2 to 16, margins 0.5 to 2, all-similar, "
            "all-dissimilar and mixed labels, dissimilar pairs inside and beyond the margin.")


# ======================================================================= 02 InfoNCE
def _lib_infonce(q, k, queue, T):
    """The library's InfoNCE (:func:`mocolab.infonce_logits` on normalised features): (logits, labels, loss)."""
    logits, labels = infonce_logits(F.normalize(q, dim=1), F.normalize(k, dim=1), queue, T)
    return logits, labels, F.cross_entropy(logits, labels)


def _infonce_variants(q_raw, k_raw, queue, T, expected):
    def lg(q, k, first=True):
        l_pos, l_neg = (q * k).sum(dim=1, keepdim=True), q @ queue
        return torch.cat([l_pos, l_neg] if first else [l_neg, l_pos], dim=1) / T

    qn, kn = F.normalize(q_raw, dim=1), F.normalize(k_raw, dim=1)
    return [
        ("positive_not_first", lambda: lg(qn, kn, first=False)),
        ("temperature_twice", expected / T),
        ("no_temperature", expected * T),
        ("temperature_multiplied", expected * T * T),
        ("not_normalised", lambda: lg(q_raw, k_raw)),
        ("not_normalised", lambda: lg(qn, k_raw)),
        ("not_normalised", lambda: lg(q_raw, kn)),
        ("normalised_wrong_dim", lambda: lg(F.normalize(q_raw, dim=0), F.normalize(k_raw, dim=0))),
        ("normalised_wrong_dim", lambda: lg(F.normalize(q_raw, dim=0), kn)),
    ]


def _cut_loss(qn, kn, queue, T, cut_pos: bool, cut_neg: bool):
    """The InfoNCE loss of unit q and k with q detached in the positive logit (``cut_pos``) or the negatives."""
    l_pos = ((qn.detach() if cut_pos else qn) * kn).sum(dim=1, keepdim=True)  # (N, 1)
    l_neg = (qn.detach() if cut_neg else qn) @ queue  # (N, K)
    return F.cross_entropy(torch.cat([l_pos, l_neg], dim=1) / T, torch.zeros(len(qn), dtype=torch.long))


#: The gradient mistakes: which side of the logits the query is detached in, as (mistake, cut_pos, cut_neg).
GRAD_MISTAKES = (("query_detached_in_negatives", False, True), ("query_detached_in_positive", True, False))


def _query_grad_variants(q_raw, k, queue, T):
    """∂L/∂q when q is detached in the negative logits, or in the positive one: (mistake, callable)."""
    def grad(cut_pos: bool, cut_neg: bool):
        q = q_raw.detach().clone().requires_grad_()
        loss = _cut_loss(F.normalize(q, dim=1), F.normalize(k.detach(), dim=1), queue, T, cut_pos, cut_neg)
        return torch.autograd.grad(loss, q)[0]
    return [(name, partial(grad, pos, neg)) for name, pos, neg in GRAD_MISTAKES]


def _check_infonce(fn) -> str:
    gen = torch.Generator().manual_seed(2)
    cases = [(4, 8, 16, 0.07), (1, 3, 5, 0.2), (6, 5, 1, 0.5), (3, 16, 32, 1.0), (5, 4, 7, 0.1), "chance"]
    for spec in cases:
        if spec == "chance":  # uninformative features: every candidate is the same direction
            n, c, K, T = 3, 4, 9, 0.2
            q_raw = 2 * torch.ones(n, c)
            k_raw = q_raw.clone()
            queue = F.normalize(torch.ones(c, K), dim=0)
            case = f"uninformative features (q, k and the queue all one direction), N = {n}, C = {c}, K = {K}: " \
                   f"the loss is the chance loss ln(K + 1) = {math.log(K + 1):.4f}"
        else:
            n, c, K, T = spec
            q_raw = 3 * torch.randn(n, c, generator=gen) + 0.5  # encoder outputs: not unit length
            k_raw = q_raw + 2 * torch.randn(n, c, generator=gen)
            queue = _unit(c, K, generator=gen, dim=0)
            case = f"N = {n}, C = {c}, K = {K}, T = {T:g}"
        inputs = f"q {_fmt(q_raw)}, k {_fmt(k_raw)}, queue {_fmt(queue)}, T = {T:g}"
        q_in = q_raw.clone().requires_grad_()
        out = _call(fn, case, inputs, q_in, k_raw.clone(), queue.clone(), T)
        q_o = q_raw.clone().requires_grad_()
        exp_logits, exp_labels, exp_loss = _lib_infonce(q_o, k_raw, queue, T)
        exp_loss.backward()
        exp_logits, exp_loss = exp_logits.detach(), exp_loss.detach()
        if not isinstance(out, (tuple, list)) or len(out) != 3:
            raise _Failure(case, "wrong_return", inputs=inputs, expected="a tuple (logits, labels, loss)",
                           got=_fmt(out))
        logits, labels, loss = out
        if not isinstance(logits, torch.Tensor) or logits.shape != exp_logits.shape:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise _Failure(case, inputs=inputs, expected=f"logits of shape (N, 1 + K) = {tuple(exp_logits.shape)}",
                           got=f"logits of shape {shape}",
                           hint="One row per query, one column per candidate: the positive, then the K negatives "
                                "(l_pos (N, 1) from q·k, l_neg (N, K) from q @ queue).")
        if not _close(logits, exp_logits):
            mistake = _diagnose(logits, _infonce_variants(q_raw, k_raw, queue, T, exp_logits), exp_logits)
            exp_text, got_text = _where(logits, exp_logits)
            raise _Failure(case, mistake, inputs=inputs, expected=f"logits {exp_text}", got=f"logits {got_text}",
                           hint="" if mistake else "logits = cat([q·k, q·queue], dim=1) / T with q and k "
                                                   "normalised along dim 1.")
        _labels_ok(case, inputs, labels, n, exp_logits)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise _Failure(case, "not_a_tensor" if not isinstance(loss, torch.Tensor) else "wrong_return",
                           inputs=inputs, expected=f"loss {_fmt(exp_loss)}", got=f"loss {_fmt(loss)}")
        if not _close(loss.reshape(()), exp_loss):
            mistake = _diagnose(loss.reshape(()), [("loss_not_mean", exp_loss * n if n > 1 else None)], exp_loss)
            raise _Failure(case, mistake, inputs=inputs, expected=f"loss {_fmt(exp_loss)}", got=f"loss {_fmt(loss)}",
                           hint="" if mistake else "loss = F.cross_entropy(logits, labels).")
        if not loss.requires_grad:
            raise _Failure(case, "detached", inputs=inputs, got=f"loss {_fmt(loss)} with requires_grad = False")
        (grad,) = torch.autograd.grad(loss, q_in, allow_unused=True)
        if grad is None:
            raise _Failure(case, "detached", inputs=inputs, expected=f"∂L/∂q {_fmt(q_o.grad)}", got="no ∂L/∂q")
        if not _close(grad, q_o.grad):
            mistake = _diagnose(grad, _query_grad_variants(q_raw, k_raw, queue, T), q_o.grad)
            exp_text, got_text = _where(grad, q_o.grad)
            raise _Failure(case, mistake, inputs=inputs, expected=f"∂L/∂q {exp_text}", got=f"∂L/∂q {got_text}",
                           hint="" if mistake else "The loss must reach q through l_pos and l_neg alike: no "
                                                   ".detach() or torch.no_grad() on the query's side.")
    return ("logits, labels, loss and ∂L/∂q on 6 cases: N = 1 to 6, C = 3 to 16, K = 1 to 32, T = 0.07 to 1, "
            "unnormalised encoder outputs, and uninformative features (loss = ln(K + 1)).")


# ======================================================================= 02 chance loss
def _lib_chance_loss(K):
    """ln(K + 1): the InfoNCE loss when all 1 + K candidates look alike."""
    return math.log(K + 1)


def _chance_variants(K: int) -> list[tuple[str, float]]:
    return [("chance_forgot_positive", math.log(K)), ("chance_log_base", math.log2(K + 1)),
            ("chance_log_base", math.log10(K + 1)), ("chance_probability", 1 / (K + 1)),
            ("chance_sign", -math.log(K + 1))]


def _check_chance_loss(fn) -> str:
    Ks = (1, 16, 1024, 65536)
    values = []
    for K in Ks:
        got = _call(fn, f"K = {K} negatives", f"K = {K}", K)
        try:
            values.append(float(got))
        except (TypeError, ValueError):
            raise _Failure(f"K = {K} negatives", "wrong_return", inputs=f"K = {K}",
                           expected=f"a number, {math.log(K + 1):.6g}", got=_fmt(got)) from None
    same = lambda a, b: math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)  # noqa: E731
    wrong = [i for i, (K, v) in enumerate(zip(Ks, values)) if not same(v, math.log(K + 1))]
    if wrong:  # a mistake is named only if it gives every answer, at every K: K = 1 alone cannot tell them apart
        at_all = [all(same(v, _chance_variants(K)[j][1]) for K, v in zip(Ks, values))
                  for j in range(len(_chance_variants(1)))]
        names = {name for (name, _), hit in zip(_chance_variants(1), at_all) if hit}
        mistake = names.pop() if len(names) == 1 else None
        K, value = Ks[wrong[0]], values[wrong[0]]
        raise _Failure(f"K = {K} negatives", mistake, inputs=f"K = {K}", expected=f"{math.log(K + 1):.6g}",
                       got=f"{value:.6g}",
                       hint="" if mistake else "With no information every one of the K + 1 candidates gets "
                                               "probability 1 / (K + 1); the loss is −log of the positive's.")
    return "K = 1, 16, 1024 and 65536, against ln(K + 1)."

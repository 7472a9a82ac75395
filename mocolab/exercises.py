"""Self-checking exercises: the learner writes a piece of MoCo, the library checks it.

Each exercise has a checker. It runs the learner's function and the library's own
implementation (the oracle) on random inputs of several shapes and on edge cases, and
answers in one block: ✓ with what was checked, or ✗ with the first failing case (its
inputs, what was expected and what came back) and a hint. When the answer matches what a
typical mistake produces (the positive not at index 0, the temperature applied twice, a
queue pointer that does not wrap, ...), the hint names that mistake (:data:`MISTAKES`).

In a notebook::

    from mocolab import exercises

    def enqueue(queue, ptr, keys):
        raise NotImplementedError  # your code here

    enqueue = exercises.check("enqueue", enqueue)

:func:`check` shows the block and returns the function to use from then on: the
learner's if it passed, the library's otherwise, so the notebook always runs on. A stub
that still raises ``NotImplementedError`` counts as "not written yet".

Headless runs print plain text instead of a coloured block, and the widget exercise
(:func:`half_mass_temperature`) prints its check instead of showing a slider. A run is
headless when the environment variable ``MOCOLAB_HEADLESS`` is ``1`` (the tour and the
notebook tests set it) or when no Jupyter kernel is running; ``MOCOLAB_HEADLESS=0``
forces the interactive form.

``python -m mocolab.exercises FILE.py`` runs every checker against the functions of the
same names in ``FILE.py`` and exits with status 1 if one fails (``make solutions`` does
this for ``notebooks/solutions/solutions.py``).

Every check runs on the CPU with its own seed, inside :func:`torch.random.fork_rng`: it
leaves the notebook's random state as it found it.
"""
from __future__ import annotations

import argparse
import copy
import html
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import ConvNet
from .losses import infonce_logits, margin_contrastive_loss
from .memory_bank import MemoryBank
from .moco import MoCo
from .momentum import momentum_update as _momentum_update
from .queue import KeyQueue
from .shuffle_bn import SplitBatchNorm, batch_shuffle, batch_unshuffle

__all__ = ["check", "run_check", "is_headless", "CheckResult", "Exercise", "EXERCISES", "MISTAKES",
           "temperature_for_mass", "half_mass_temperature", "main"]

# ======================================================================= mistakes
#: Typical mistakes, each with the hint shown when a learner's answer matches it.
MISTAKES: dict[str, str] = {
    # InfoNCE and the MoCo step
    "positive_not_first": "The positive is not at index 0. Put l_pos first, logits = cat([l_pos, l_neg], dim=1): "
                          "then the label of every row is 0.",
    "temperature_twice": "The temperature is applied twice (for example q / T and then logits / T). Divide by T once.",
    "no_temperature": "The logits are not divided by the temperature T.",
    "temperature_multiplied": "The logits are multiplied by T; divide them by T.",
    "not_normalised": "The features are not L2-normalised. Normalise q and k along the feature dimension, "
                      "F.normalize(x, dim=1), so that a dot product is a cosine similarity.",
    "normalised_wrong_dim": "The features are normalised along the batch (dim=0). Each row is one feature vector: "
                            "F.normalize(x, dim=1).",
    "labels_not_zero": "The labels must all be 0, as a long tensor: torch.zeros(N, dtype=torch.long). The positive "
                       "is column 0 of every row (arange(N) is the in-batch layout of notebook 01).",
    "loss_not_mean": "The loss is summed over the batch; average it (F.cross_entropy averages by default).",
    "key_not_detached": "A gradient reaches the key encoder: the key is not detached. Compute the keys under "
                        "torch.no_grad() (or .detach() them); the key encoder moves only by the momentum update.",
    "queries_without_grad": "No gradient reaches the query encoder. Compute q with gradients (not under "
                            "torch.no_grad(), not detached); only the keys are detached.",
    "keys_before_momentum": "The keys were computed before the momentum update. MoCo first updates the key encoder, "
                            "then computes the keys with it.",
    "keys_from_query_encoder": "The keys come from the query encoder; they must come from the key encoder, encoder_k.",
    "enqueue_before_logits": "The queue was updated before the logits were computed, so the batch's keys also act "
                             "as their own negatives. Compute the logits first, then enqueue.",
    "queue_not_cloned": "The logits keep a reference to the queue, which the enqueue then overwrites in place, so "
                        "the backward pass fails. Use a copy as the negatives: queue.clone().detach(), as MoCo does.",
    # the margin loss
    "labels_swapped": "The labels are swapped. Y = 0 marks a similar pair (pulled together: ½·D²), Y = 1 a "
                      "dissimilar pair (pushed apart: ½·max(0, margin − D)²).",
    "labels_ignored": "The labels y are not used: pairs with y = 0 take the similar term, pairs with y = 1 the "
                      "dissimilar term.",
    "missing_half": "A factor ½ is missing: L = (1 − Y)·½·D² + Y·½·max(0, margin − D)².",
    "hinge_not_clamped": "The dissimilar term is not clamped at 0. Use max(0, margin − D)², "
                         "torch.clamp(margin - D, min=0) ** 2: a pair farther apart than the margin costs nothing.",
    "hinge_on_squared_distance": "The hinge uses D² where it needs D. The dissimilar term is ½·max(0, margin − D)² "
                                 "with D = ‖x1 − x2‖ (take the square root of the squared distance).",
    "hinge_not_squared": "The dissimilar term is not squared: ½·max(0, margin − D)².",
    "distance_not_squared": "The similar term uses D where it needs D²: ½·D².",
    "margin_ignored": "The margin argument is not used (your result matches margin = 1).",
    "detached": "The result is cut off from autograd (.item(), .detach(), numpy or torch.no_grad() inside): a loss "
                "must stay differentiable.",
    "not_a_tensor": "Return a torch tensor (a 0-dimensional tensor for a loss), not a Python number: .item() cuts "
                    "the gradient.",
    # the chance loss
    "chance_forgot_positive": "That is ln(K): the softmax has K + 1 candidates, the positive and the K negatives.",
    "chance_log_base": "Use the natural logarithm (math.log): the cross-entropy is measured in nats.",
    "chance_probability": "That is the probability of the positive, 1 / (K + 1). The loss is its negative log.",
    "chance_sign": "The sign is wrong: the loss is −log(1 / (K + 1)) = ln(K + 1), which is positive.",
    # the memory bank
    "bank_momentum_reversed": "The momentum is applied the wrong way round: m weighs the old entry, "
                              "new = m·old + (1 − m)·feature.",
    "bank_not_renormalised": "The new entries are not L2-normalised. A mix of two unit vectors is shorter than 1: "
                             "F.normalize(new, dim=1) before writing it back.",
    "bank_ignores_index": "The rows written are not memory[index]: the i-th feature of the batch belongs to row "
                          "index[i] of the bank.",
    "bank_other_rows": "Rows outside index changed: only the entries of the batch's samples are rewritten.",
    "not_updated_in_place": "The tensor passed in is unchanged. Write into it (memory[index] = …, queue[:, cols] = …) "
                            "instead of building and returning a new one.",
    "not_detached": "What was written is still attached to autograd. Write detached values (features.detach(), or "
                    "the whole update under torch.no_grad()): a bank or a queue stores numbers, not a graph.",
    # the queue
    "pointer_off_by_one": "The queue pointer is off by one. After N keys written from column ptr, the next free "
                          "column is (ptr + N) % K.",
    "pointer_not_wrapping": "The queue pointer does not wrap around. Columns are taken modulo K: keys that run past "
                            "column K − 1 go to columns 0, 1, …, and the new pointer is (ptr + N) % K.",
    "queue_reset_instead_of_wrap": "When the batch runs past the end, the batch is written again from column 0. The "
                                   "keys that fit go to the end, the rest to columns 0, 1, …, so that the oldest keys "
                                   "are overwritten first (the official code sidesteps this by requiring K % N == 0).",
    "queue_ignores_pointer": "The keys are written from column 0 every time: start at column ptr.",
    "keys_as_rows": "The queue holds keys as columns, (C, K), while keys is (N, C): write keys.T, "
                    "queue[:, cols] = keys.T.",
    "keys_reversed": "The keys are written in reverse order: key i goes to column (ptr + i) % K.",
    # the momentum update
    "momentum_reversed": "The momentum is applied the wrong way round: θk ← (1 − m)·θk + m·θq. With m close to 1 the "
                         "key encoder keeps most of its own weights: θk ← m·θk + (1 − m)·θq.",
    "query_updated": "The query encoder was changed (θq ← …). Only the key encoder moves, θk ← m·θk + (1 − m)·θq; "
                     "θq is changed by the optimizer alone.",
    "not_in_place": "A new tensor was allocated per parameter where an in-place update was asked (p.data = … or a "
                    "new nn.Parameter). Update the existing tensors: p_k.mul_(m).add_(p_q, alpha=1 - m).",
    "momentum_not_no_grad": "The momentum update is recorded by autograd. Run it under torch.no_grad(): the key "
                            "encoder gets no gradient history.",
    "momentum_buffers": "BatchNorm's running statistics were averaged too. MoCo's update covers the parameters only "
                        "(encoder.parameters()); the key encoder's statistics come from its own forward passes.",
    "momentum_missing": "The key encoder did not move: θk ← m·θk + (1 − m)·θq comes first in every step.",
    # the shuffle
    "shuffle_not_undone": "The shuffle is not undone: the keys come back in shuffled order, so key i no longer "
                          "belongs to query i. Reorder them with the inverse permutation, argsort(idx_shuffle).",
    "unshuffle_with_shuffle_index": "The keys are reordered with the shuffle permutation itself, which shuffles them "
                                    "a second time. Undo it with the inverse permutation, argsort(idx_shuffle).",
    "not_shuffled": "The batch reaches the encoder in its original order. Shuffle it first: "
                    "im_k[idx_shuffle] with idx_shuffle = torch.randperm(N).",
    "one_encoder_call": "Encode the whole shuffled batch in one call to the encoder: BatchNorm's statistics come "
                        "from the batch it sees, and that is what the shuffle is about.",
    # anything else
    "raised": "Your function raised an error on this case (shown above).",
    "wrong_return": "The function does not return what the exercise asks for.",
}


# ======================================================================= results
class _NotWritten(Exception):
    """The learner's function still raises NotImplementedError."""


class _Failure(Exception):
    def __init__(self, case: str, mistake: str | None = None, *, inputs: str = "", expected: str = "",
                 got: str = "", hint: str = ""):
        super().__init__(case)
        self.case, self.mistake, self.inputs, self.expected, self.got = case, mistake, inputs, expected, got
        self.hint = hint or (MISTAKES[mistake] if mistake else "")


@dataclass
class CheckResult:
    """The answer of a checker: passed, failed (first failing case, hint) or not written yet."""

    exercise: str
    title: str
    status: str  # "passed", "failed" or "not written"
    oracle: str = ""
    checked: str = ""
    case: str = ""
    inputs: str = ""
    expected: str = ""
    got: str = ""
    hint: str = ""
    mistake: str | None = None  # a key of MISTAKES when the answer matched a known mistake
    fallback: str = ""  # set by check(): what the notebook uses instead
    headless: bool = False

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def lines(self) -> list[str]:
        if self.passed:
            out = [f"✓ {self.title}: your function agrees with {self.oracle}.", f"  Checked: {self.checked}"]
            return out + (["  The notebook uses your function from here on."] if self.fallback else [])
        if self.status == "not written":
            out = [f"… {self.title}: not written yet (the stub raises NotImplementedError)."]
            if self.fallback:
                if self.headless:
                    out.append(f"  Headless run: the notebook continues with mocolab's implementation, {self.fallback}.")
                else:
                    out += ["  Replace `raise NotImplementedError` with your code and run the cell again.",
                            f"  Meanwhile the notebook continues with mocolab's implementation, {self.fallback}."]
            return out
        out = [f"✗ {self.title}: not right yet.", f"  Case: {self.case}"]
        for label, text in (("Inputs", self.inputs), ("Expected", self.expected), ("Got", self.got)):
            if text:
                out.append(f"  {label}: {text}")
        if self.hint:
            out.append(f"  Hint: {self.hint}")
        if self.fallback:
            out.append(f"  The notebook continues with mocolab's implementation, {self.fallback}.")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython's text/plain form: the block itself
        printer.text(str(self))

    def _repr_html_(self) -> str:
        colour = {"passed": "#2e7d32", "failed": "#c62828"}.get(self.status, "#ef6c00")
        background = {"passed": "#edf7ee", "failed": "#fdecea"}.get(self.status, "#fff4e5")
        return (f'<pre style="border-left: 6px solid {colour}; background: {background}; padding: 0.5em 0.8em; '
                f'white-space: pre-wrap; margin: 0.3em 0">{html.escape(str(self))}</pre>')


def _show(result: CheckResult) -> None:
    if not result.headless:
        try:
            from IPython.display import display

            display(result)
            return
        except ImportError:  # pragma: no cover - IPython comes with the notebook dependencies
            pass
    print(result, flush=True)


# ======================================================================= helpers
def _fmt(x: Any, limit: int = 8) -> str:
    """A short printable form of a value: tensors as shape and first values."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dim() == 0:
            return f"{t.item():.6g}" if t.is_floating_point() else str(t.item())
        values = t.flatten()[:limit].tolist()
        text = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values)
        more = ", …" if t.numel() > limit else ""
        dtype = "" if t.dtype == torch.float32 else f", {str(t.dtype).replace('torch.', '')}"
        return f"tensor {tuple(t.shape)}{dtype} [{text}{more}]"
    if isinstance(x, float):
        return f"{x:.6g}"
    if isinstance(x, (tuple, list)) and len(x) <= 4:
        return "(" + ", ".join(_fmt(v) for v in x) + ")"
    text = repr(x)
    return text if len(text) <= 120 else text[:117] + "..."


def _close(got: Any, expected: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return False
    got = got.detach().cpu()
    if not got.is_floating_point() and expected.is_floating_point():
        got = got.to(expected.dtype)
    if got.dtype != expected.dtype:
        got = got.to(expected.dtype)
    return bool(torch.allclose(got, expected, rtol=rtol, atol=atol))


def _where(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5):
    """(expected text, got text) showing the first row (or element) where two same-shaped tensors differ."""
    g, e = got.detach().cpu().to(expected.dtype), expected
    bad = (~torch.isclose(g, e, rtol=rtol, atol=atol)).nonzero()
    if g.dim() == 0 or not len(bad):
        return _fmt(e), _fmt(g)
    i = tuple(bad[0].tolist())
    if g.dim() == 1:
        return (f"{_fmt(e)}; at [{i[0]}]: {e[i].item():.6g}", f"{_fmt(g)}; at [{i[0]}]: {g[i].item():.6g}")
    return (f"{tuple(e.shape)}, row {i[0]} = {_fmt(e[i[0]])}", f"{tuple(g.shape)}, row {i[0]} = {_fmt(g[i[0]])}")


def _diagnose(got: Any, variants, rtol: float = 1e-4, atol: float = 1e-5) -> str | None:
    """The first mistake whose output ``got`` matches; ``variants``: (mistake, tensor or zero-argument callable)."""
    if not isinstance(got, torch.Tensor):
        return None
    for mistake, value in variants:
        try:
            value = value() if callable(value) else value
        except Exception:  # a variant that cannot be computed for this case
            continue
        if isinstance(value, torch.Tensor) and _close(got, value, rtol, atol):
            return mistake
    return None


def _error_text(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _call(fn: Callable, case: str, inputs: str, *args, classify: Callable[[BaseException], str | None] | None = None):
    """``fn(*args)``; NotImplementedError means "not written yet", any other error fails the case."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise _NotWritten from None
    except Exception as err:
        mistake = classify(err) if classify else None
        raise _Failure(case, mistake or "raised", inputs=inputs, got=f"raised {_error_text(err)}") from None


def _unit(*shape, generator, dim=-1) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=generator), dim=dim)


def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value)
    return None


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _float_buffers(module: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in module.buffers() if b.is_floating_point()]


def _all_close(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.allclose(x.detach(), y.detach(), rtol=rtol, atol=atol)
                                    for x, y in zip(a, b))


def _all_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x.detach(), y.detach()) for x, y in zip(a, b))


def _first_param_diff(module: nn.Module, expected: list[torch.Tensor]) -> tuple[str, str]:
    for (name, p), e in zip(module.named_parameters(), expected):
        if not torch.allclose(p.detach(), e, rtol=1e-4, atol=1e-6):
            return f"{name} = {_fmt(e)}", f"{name} = {_fmt(p)}"
    return "", ""


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
            mistake = _diagnose(got, variants)
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
            mistake = _diagnose(logits, _infonce_variants(q_raw, k_raw, queue, T, exp_logits))
            exp_text, got_text = _where(logits, exp_logits)
            raise _Failure(case, mistake, inputs=inputs, expected=f"logits {exp_text}", got=f"logits {got_text}",
                           hint="" if mistake else "logits = cat([q·k, q·queue], dim=1) / T with q and k "
                                                   "normalised along dim 1.")
        if (not isinstance(labels, torch.Tensor) or labels.shape != (n,) or labels.dtype != torch.long
                or bool((labels != 0).any())):
            raise _Failure(case, "labels_not_zero", inputs=inputs, expected=_fmt(exp_labels), got=_fmt(labels))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise _Failure(case, "not_a_tensor" if not isinstance(loss, torch.Tensor) else "wrong_return",
                           inputs=inputs, expected=f"loss {_fmt(exp_loss)}", got=f"loss {_fmt(loss)}")
        if not _close(loss.reshape(()), exp_loss):
            mistake = _diagnose(loss.reshape(()), [("loss_not_mean", exp_loss * n if n > 1 else None)])
            raise _Failure(case, mistake, inputs=inputs, expected=f"loss {_fmt(exp_loss)}", got=f"loss {_fmt(loss)}",
                           hint="" if mistake else "loss = F.cross_entropy(logits, labels).")
        if not loss.requires_grad:
            raise _Failure(case, "detached", inputs=inputs, got=f"loss {_fmt(loss)} with requires_grad = False")
        (grad,) = torch.autograd.grad(loss, q_in, allow_unused=True)
        if grad is None or not _close(grad, q_o.grad):
            raise _Failure(case, "detached", inputs=inputs, expected=f"∂L/∂q {_fmt(q_o.grad)}", got=f"∂L/∂q {_fmt(grad)}")
    return ("logits, labels, loss and ∂L/∂q on 6 cases: N = 1 to 6, C = 3 to 16, K = 1 to 32, T = 0.07 to 1, "
            "unnormalised encoder outputs, and uninformative features (loss = ln(K + 1)).")


# ======================================================================= 02 chance loss
def _lib_chance_loss(K):
    """ln(K + 1): the InfoNCE loss when all 1 + K candidates look alike."""
    return math.log(K + 1)


def _check_chance_loss(fn) -> str:
    for K in (1, 16, 1024, 65536):
        case = f"K = {K} negatives"
        got = _call(fn, case, f"K = {K}", K)
        expected = math.log(K + 1)
        try:
            value = float(got)
        except (TypeError, ValueError):
            raise _Failure(case, "wrong_return", inputs=f"K = {K}", expected=f"{expected:.6g}", got=_fmt(got)) from None
        if not math.isclose(value, expected, rel_tol=1e-6):
            variants = [("chance_forgot_positive", math.log(K)), ("chance_log_base", math.log2(K + 1)),
                        ("chance_log_base", math.log10(K + 1)), ("chance_probability", 1 / (K + 1)),
                        ("chance_sign", -expected)]
            mistake = next((name for name, v in variants if math.isclose(value, v, rel_tol=1e-6, abs_tol=1e-12)), None)
            raise _Failure(case, mistake, inputs=f"K = {K}", expected=f"{expected:.6g}", got=f"{value:.6g}",
                           hint="" if mistake else "With no information every one of the K + 1 candidates gets "
                                                   "probability 1 / (K + 1); the loss is −log of the positive's.")
    return "K = 1, 16, 1024 and 65536, against ln(K + 1)."


# ======================================================================= 02 widget: half the mass on the positive
def temperature_for_mass(similarities, mass: float = 0.5) -> float:
    """The temperature T at which ``softmax(similarities / T)`` gives the positive (index 0) probability ``mass``.

    The positive's probability falls from 1 (T → 0) to 1 / (K + 1) (T → ∞) when the positive is the most
    similar candidate, so there is one such T; it is found by bisection on log T.

    Raises:
        ValueError: the positive is not strictly the largest similarity, or ``mass`` is outside (1 / (K + 1), 1).
    """
    from .metrics import _as_1d, temperature_softmax

    s = _as_1d(similarities, "similarities")
    if s.shape[0] < 2 or not s[0] > s[1:].max():
        raise ValueError("the positive (index 0) must be strictly the most similar candidate")
    if not 1.0 / s.shape[0] < mass < 1.0:
        raise ValueError(f"mass must lie in (1 / (K + 1), 1) = ({1 / s.shape[0]:.4g}, 1), got {mass}")
    lo, hi = math.log(1e-6), math.log(1e6)  # p(positive) is above mass at lo, below it at hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if temperature_softmax(s, math.exp(mid))["probs"][0] > mass:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def _prediction_verdict(prediction, answer: float) -> tuple[str, float | None]:
    """A sentence on the learner's prediction, and the prediction as a temperature (None if it is not one)."""
    if prediction is None:
        return "You made no prediction yet.", None
    try:
        p = float(prediction)
    except (TypeError, ValueError):
        return f"Your prediction {prediction!r} is not a number.", None
    if not (p > 0 and math.isfinite(p)):
        return f"Your prediction T = {p:g} is not a temperature (T > 0).", None
    factor = max(p / answer, answer / p)
    verdict = "spot on" if factor < 1.15 else "close" if factor < 1.5 else f"off by a factor {factor:.1f}"
    return f"Your prediction, T = {p:.3g}, was {verdict}.", p


def half_mass_temperature(prediction=None, similarities=None, *, K: int = 16, seed: int = 0, mass: float = 0.5,
                          tolerance: float = 0.02):
    """Predict, then check with a slider: the temperature at which the positive gets half the softmax mass.

    Interactive: a slider over T, the bars of the softmax (positive in green) and a line that says whether the
    positive's probability is above or below ``mass``; within ``tolerance`` of it the line reveals the answer
    and compares it with ``prediction``. Headless (see :func:`is_headless`): prints the check and returns None.

    Args:
        prediction: the learner's guess of T (None: no guess yet).
        similarities: (K + 1,) cosines, positive first; default
            :func:`mocolab.metrics.default_similarities` (K negatives, ``seed``).
        mass: the positive's probability to reach (default ½).

    Returns:
        the widget (an ``ipywidgets.VBox`` with ``.controls["T"]`` and ``.output``), or None headless.
    """
    from .metrics import _as_1d, default_similarities, temperature_softmax
    from .plotting import plot_temperature_softmax
    from .widgets import _explorer

    sims = default_similarities(K, seed) if similarities is None else _as_1d(similarities, "similarities")
    answer = temperature_for_mass(sims, mass)
    verdict, guess = _prediction_verdict(prediction, answer)
    if is_headless():
        at_guess = ""
        if guess is not None:
            at_guess = f" At your T, p(positive) = {temperature_softmax(sims, guess)['probs'][0]:.3f}."
        print(f"Predict, then check (headless run, no slider): the softmax over these {len(sims)} similarities "
              f"puts {mass:g} of its mass on the positive at T = {answer:.3g}. {verdict}{at_guess}", flush=True)
        return None

    import ipywidgets as w

    start = guess if guess is not None else 1.0
    lo, hi = min(-2.0, math.floor(math.log10(start))), max(1.0, math.ceil(math.log10(start)))
    slider = w.FloatLogSlider(value=start, base=10, min=lo, max=hi, step=0.005, description="T",
                              readout_format=".3f", continuous_update=True)

    def render(T):
        r = temperature_softmax(sims, T)
        p = r["probs"][0]
        if abs(p - mass) <= tolerance:
            text = (f"✓ T = {T:.3f}: p(positive) = {p:.3f}, about {mass:g}. The exact value is T = {answer:.3f}. "
                    f"{verdict}")
        elif p > mass:
            text = f"T = {T:.3f}: p(positive) = {p:.3f}, more than {mass:g}: raise T to flatten the softmax."
        else:
            text = f"T = {T:.3f}: p(positive) = {p:.3f}, less than {mass:g}: lower T to sharpen the softmax."
        return text, plot_temperature_softmax(r)

    return _explorer({"T": slider}, render, f"Find the T at which the positive gets {mass:g} of the mass")


# ======================================================================= 03 memory-bank update
def _lib_bank_update(memory, index, features, m):
    """The library's update (:meth:`mocolab.MemoryBank.update`), in place on ``memory``."""
    with torch.random.fork_rng(devices=[]):  # building a bank draws random entries: leave the caller's stream alone
        bank = MemoryBank(max(2, memory.shape[0]), memory.shape[1], m=m)
    bank.memory = memory  # the bank now writes into the caller's tensor
    bank.update(index, features)


def _check_bank_update(fn) -> str:
    gen = torch.Generator().manual_seed(3)
    cases = [(10, 4, 3, 0.3), (7, 3, 7, 0.8), (12, 5, 1, 0.9), (9, 4, 4, 0.0), (9, 4, 4, 1.0), (16, 8, 5, 0.5)]
    for M, c, n, m in cases:
        memory = _unit(M, c, generator=gen)
        index = torch.randperm(M, generator=gen)[:n]
        features = _unit(n, c, generator=gen)
        case = f"M = {M} entries of C = {c}, N = {n} features, m = {m:g}"
        inputs = f"index = {index.tolist()}, features {_fmt(features)}, m = {m:g}"
        before = memory.clone()
        feats = features.clone().requires_grad_()  # as q comes from the encoder
        returned = _call(fn, case, inputs, memory, index.clone(), feats, m)
        expected = before.clone()
        _lib_bank_update(expected, index, features, m)
        if memory.requires_grad or memory.grad_fn is not None:
            raise _Failure(case, "not_detached", inputs=inputs, got="memory now requires grad")
        if torch.equal(memory, before) and not torch.equal(expected, before):
            raise _Failure(case, "not_updated_in_place", inputs=inputs, expected=f"rows {index.tolist()} rewritten",
                           got="memory unchanged" + (f"; returned {_fmt(returned)}" if returned is not None else ""))
        if not _close(memory, expected, atol=1e-6):
            old = before[index]

            def placed(rows, at=index):
                out = before.clone()
                out[at] = rows
                return out

            first = torch.arange(n)
            variants = [
                ("bank_momentum_reversed", lambda: placed(F.normalize(m * features + (1 - m) * old, dim=1))),
                ("bank_not_renormalised", lambda: placed(m * old + (1 - m) * features)),
                ("normalised_wrong_dim", lambda: placed(F.normalize(m * old + (1 - m) * features, dim=0))),
                ("bank_ignores_index", lambda: placed(F.normalize(m * before[:n] + (1 - m) * features, dim=1), first)),
                ("bank_ignores_index", lambda: placed(F.normalize(m * old + (1 - m) * features, dim=1), first)),
            ]
            mistake = _diagnose(memory, variants, atol=1e-6)
            if mistake is None:
                rest = torch.ones(M, dtype=torch.bool)
                rest[index] = False
                if not torch.equal(memory[rest], before[rest]):
                    mistake = "bank_other_rows"
            exp_text, got_text = _where(memory, expected, atol=1e-6)
            raise _Failure(case, mistake, inputs=inputs, expected=f"memory {exp_text}", got=f"memory {got_text}",
                           hint="" if mistake else "memory[index] = F.normalize(m * memory[index] + (1 - m) * "
                                                   "features, dim=1), without gradients.")
    return ("the whole bank after 6 updates: M = 7 to 16 entries, N = 1 to M features, m = 0, 0.3 to 0.9 and 1, "
            "features that carry gradients; untouched rows stay as they were.")


# ======================================================================= 04 ring buffer
def _lib_enqueue(queue, ptr, keys):
    """The library's enqueue (:meth:`mocolab.KeyQueue.enqueue`), in place on ``queue``; returns the new pointer."""
    with torch.random.fork_rng(devices=[]):  # building a queue draws random keys: leave the caller's stream alone
        kq = KeyQueue(queue.shape[0], queue.shape[1])
    kq.load_state_dict({"queue": queue.detach(), "queue_ptr": torch.tensor([int(ptr)])}, strict=False)
    kq.enqueue(keys.detach())
    with torch.no_grad():
        queue.copy_(kq.queue)
    return int(kq.queue_ptr)


def _queue_variants(before, ptr, keys, K):
    n = keys.shape[0]
    k = keys.detach()

    def written(at, cols_keys=k):
        out = before.clone()
        out[:, torch.as_tensor(at) % K] = cols_keys.t()
        return out

    ring = [(ptr + i) % K for i in range(n)]
    return [
        ("queue_reset_instead_of_wrap", (lambda: written(list(range(n)))) if ptr + n > K else None),
        ("queue_ignores_pointer", lambda: written(list(range(n)))),
        ("keys_reversed", lambda: written(ring, k.flip(0))),
        ("pointer_off_by_one", lambda: written([(ptr + 1 + i) % K for i in range(n)])),
        ("pointer_off_by_one", lambda: written([(ptr - 1 + i) % K for i in range(n)])),
    ]


def _check_queue_state(case, inputs, queue, got_ptr, exp_queue, exp_ptr, before, ptr, keys, atol=1e-6):
    """Compare a queue and its pointer after an enqueue with the expected ones; name the mistake if known."""
    K, n = queue.shape[1], keys.shape[0]
    if queue.requires_grad or queue.grad_fn is not None:
        raise _Failure(case, "not_detached", inputs=inputs, got="the queue now requires grad")
    if torch.equal(queue, before) and not torch.equal(exp_queue, before):
        raise _Failure(case, "not_updated_in_place", inputs=inputs,
                       expected=f"columns {[(ptr + i) % K for i in range(n)]} rewritten", got="queue unchanged")
    p = _as_int(got_ptr)
    if p is None:
        raise _Failure(case, "wrong_return", inputs=inputs, expected=f"the new pointer, an int: {exp_ptr}",
                       got=_fmt(got_ptr))
    if not _close(queue, exp_queue, atol=atol):
        mistake = _diagnose(queue, _queue_variants(before, ptr, keys, K), atol=atol)
        if mistake is None and p not in range(K):
            mistake = "pointer_not_wrapping"
        exp_text, got_text = _where(queue.t(), exp_queue.t(), atol=atol)
        raise _Failure(case, mistake, inputs=inputs,
                       expected=f"pointer {exp_ptr}; queue columns: {exp_text.replace('row', 'column')}",
                       got=f"pointer {p}; queue columns: {got_text.replace('row', 'column')}",
                       hint="" if mistake else "Key i goes to column (ptr + i) % K of the queue.")
    if p != exp_ptr:
        mistake = ("pointer_not_wrapping" if p == ptr + n or p >= K
                   else "pointer_off_by_one" if abs(p - exp_ptr) == 1 or {p, exp_ptr} == {0, K - 1}
                   else None)
        raise _Failure(case, mistake, inputs=inputs, expected=f"pointer {exp_ptr}", got=f"pointer {p}",
                       hint="" if mistake else "The new pointer is (ptr + N) % K.")
    return p


def _queue_error_classifier(ptr, n, K, rows: bool = True):
    def classify(err):
        text = str(err)
        if ptr + n > K and any(w in text for w in ("shape", "size", "index", "bounds", "match")):
            return "pointer_not_wrapping"
        if rows and ("shape" in text or "size" in text):
            return "keys_as_rows"
        if "leaf Variable" in text or "requires grad" in text:
            return "not_detached"
        return None
    return classify


def _check_enqueue(fn) -> str:
    gen = torch.Generator().manual_seed(4)
    sequences = [(3, 8, [2, 2, 2, 2, 2]), (3, 10, [4, 4, 4, 4]), (2, 7, [7, 7]), (4, 5, [1] * 6),
                 (3, 9, [4, 2, 5, 3]), (5, 6, [4, 4, 4])]
    for s, (c, K, batches) in enumerate(sequences):
        torch.default_generator.manual_seed(100 + s)
        oracle = KeyQueue(c, K)  # random unit keys, pointer 0
        queue = oracle.queue.clone()
        ptr = 0
        for call, n in enumerate(batches, start=1):
            keys = _unit(n, c, generator=gen)
            if s == len(sequences) - 1:
                keys.requires_grad_()  # the last sequence: keys fresh from an encoder, with gradients
            wraps = " (this batch runs past the end)" if ptr + n > K else ""
            case = f"K = {K} keys of C = {c}, batches of {batches}: call {call}, ptr = {ptr}, N = {n}{wraps}"
            inputs = f"queue {tuple(queue.shape)}, ptr = {ptr}, keys {_fmt(keys)}"
            before = queue.clone()
            got_ptr = _call(fn, case, inputs, queue, ptr, keys, classify=_queue_error_classifier(ptr, n, K))
            oracle.enqueue(keys.detach())
            ptr = _check_queue_state(case, inputs, queue, got_ptr, oracle.queue, int(oracle.queue_ptr), before, ptr,
                                     keys)
    return ("queue and pointer after every call of 6 sequences (25 calls) against mocolab.KeyQueue: K = 5 to 10, "
            "N = 1 to K, K not divisible by N (writes that wrap around), N = K, varying N, keys with gradients.")


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
        encoder_q, encoder_k = _small_net(gen), _small_net(gen)
        for p in encoder_k.parameters():
            p.requires_grad = False  # as in MoCo
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
            raise _Failure(case, mistake, inputs=f"{inputs}; shuffle used: {perm.tolist()}", expected=f"keys {exp_text}",
                           got=f"keys {got_text}", hint="" if mistake else "Keys: shuffle, encode, L2-normalise (dim=1), "
                                                                 "then unshuffle with argsort(idx_shuffle).")
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
            mistake = ("momentum_reversed" if _all_close(got_k, [(1 - m) * a + m * b for a, b in zip(k_before, q_before)],
                                                         atol=1e-5)
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


# ======================================================================= the table
@dataclass(frozen=True)
class Exercise:
    """One exercise: where it is, the function the learner writes, its checker and the library's version."""

    name: str
    notebook: str
    title: str
    signature: str
    checker: Callable[[Callable], str]
    library: Callable
    oracle: str


EXERCISES: dict[str, Exercise] = {e.name: e for e in [
    Exercise("margin_loss", "01", "01 · the margin contrastive loss", "margin_loss(x1, x2, y, margin) -> loss",
             _check_margin_loss, _lib_margin_loss, "mocolab.margin_contrastive_loss"),
    Exercise("infonce", "02", "02 · InfoNCE logits and loss", "infonce(q, k, queue, T) -> (logits, labels, loss)",
             _check_infonce, _lib_infonce, "mocolab.infonce_logits"),
    Exercise("chance_loss", "02", "02 · the chance loss", "chance_loss(K) -> float",
             _check_chance_loss, _lib_chance_loss, "ln(K + 1)"),
    Exercise("bank_update", "03", "03 · the memory-bank update", "bank_update(memory, index, features, m) -> None",
             _check_bank_update, _lib_bank_update, "mocolab.MemoryBank.update"),
    Exercise("enqueue", "04", "04 · enqueue on a ring buffer", "enqueue(queue, ptr, keys) -> new ptr",
             _check_enqueue, _lib_enqueue, "mocolab.KeyQueue.enqueue"),
    Exercise("momentum_update", "05", "05 · the momentum update, in place",
             "momentum_update(encoder_k, encoder_q, m) -> None",
             _check_momentum_update, _momentum_update, "mocolab.momentum_update"),
    Exercise("shuffled_keys", "06", "06 · keys with the batch shuffled", "shuffled_keys(encoder_k, im_k) -> k",
             _check_shuffled_keys, _lib_shuffled_keys, "mocolab.batch_shuffle and batch_unshuffle"),
    Exercise("moco_step", "07", "07 · the whole MoCo step",
             "moco_step(encoder_q, encoder_k, queue, ptr, im_q, im_k, m, T) -> (logits, labels, new ptr)",
             _check_moco_step, _lib_moco_step, "mocolab.MoCo"),
]}


def _exercise(name: str) -> Exercise:
    if name not in EXERCISES:
        raise ValueError(f"no exercise named {name!r}; choose one of {', '.join(EXERCISES)}")
    return EXERCISES[name]


# ======================================================================= entry points
def is_headless() -> bool:
    """True in the tour, the notebook tests and scripts; False in a notebook opened in Jupyter.

    ``MOCOLAB_HEADLESS=1`` (or true/yes/on) says headless, ``0`` (false/no/off) says interactive; unset, a run
    is headless unless it runs in a Jupyter kernel.
    """
    flag = os.environ.get("MOCOLAB_HEADLESS", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with the notebook dependencies
        return True
    shell = get_ipython()
    return shell is None or "IPKernelApp" not in getattr(shell, "config", {})


def run_check(name: str, fn) -> CheckResult:
    """Run the checker of exercise ``name`` on ``fn`` and return its answer (nothing is printed).

    Never raises for a wrong ``fn``: its errors become a failed case.
    """
    ex = _exercise(name)
    result = CheckResult(exercise=name, title=ex.title, status="failed", oracle=ex.oracle)
    if fn is None:
        result.status = "not written"
        return result
    if not callable(fn):
        result.case, result.got = "calling it", _fmt(fn)
        result.hint = f"Pass the function itself: {ex.signature}."
        return result
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)
        try:
            result.checked = ex.checker(fn)
            result.status = "passed"
        except _NotWritten:
            result.status = "not written"
        except _Failure as f:
            result.case, result.inputs, result.expected, result.got = f.case, f.inputs, f.expected, f.got
            result.hint, result.mistake = f.hint, f.mistake
        except Exception as err:  # an answer the checker could not even compare
            result.case = "comparing your answer with the library's"
            result.got = _error_text(err)
            result.mistake = "wrong_return"
            result.hint = f"{MISTAKES['wrong_return']} Expected: {ex.signature}."
    return result


def check(name: str, fn, *, show: bool = True):
    """Check the learner's function for exercise ``name``, show the answer, and return the function to use.

    Returns ``fn`` if it passed, otherwise the library's implementation (also when ``fn`` still raises
    ``NotImplementedError``), so the notebook continues either way.
    """
    ex = _exercise(name)
    result = run_check(name, fn)
    result.headless = is_headless()
    result.fallback = f"{ex.oracle}" if not result.passed else "yours"
    if show:
        _show(result)
    return fn if result.passed else ex.library


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_mocolab_solutions_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    """Run every checker against the functions of the same names in a file; 1 if any fails."""
    parser = argparse.ArgumentParser(prog="python -m mocolab.exercises",
                                     description="Check functions named after the exercises against the library.")
    parser.add_argument("path", type=Path, help="a Python file defining margin_loss, infonce, ... (see EXERCISES)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="check only this exercise")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only) - set(EXERCISES))
    if unknown:
        parser.error(f"no exercise named {unknown}; choose from {list(EXERCISES)}")
    module = _load(args.path)
    names = args.only or list(EXERCISES)
    failed = []
    for name in names:
        fn = getattr(module, name, None)
        if fn is None:
            print(f"✗ {EXERCISES[name].title}: {args.path} defines no function {name}.")
            failed.append(name)
            continue
        result = run_check(name, fn)
        print(result, flush=True)
        if not result.passed:
            failed.append(name)
    print(f"{len(names) - len(failed)} of {len(names)} exercises pass" + (f"; failed: {', '.join(failed)}" if failed
                                                                          else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

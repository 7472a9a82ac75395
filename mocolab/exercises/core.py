"""The machinery every checker shares: failures, the answer block (a ✓ may carry a note on what a correct form
costs), headless detection, and comparisons that name a mistake only where the case tells it apart."""

from __future__ import annotations

import html
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .mistakes import MISTAKES

__all__ = ["CheckResult", "Checked", "is_headless"]


# ======================================================================= results
class _NotWritten(Exception):
    """The learner's function still raises NotImplementedError."""


class _Failure(Exception):
    def __init__(self, case: str, mistake: str | None = None, *, inputs: str = "", expected: str = "",
                 got: str = "", hint: str = ""):
        super().__init__(case)
        self.case, self.mistake, self.inputs, self.expected, self.got = case, mistake, inputs, expected, got
        self.hint = hint or (MISTAKES[mistake] if mistake else "")


class Checked(str):
    """What a checker checked (its ✓ line), with an optional ``note``: the cost of a correct but costly form."""

    def __new__(cls, text: str, note: str = ""):
        self = super().__new__(cls, text)
        self.note = note
        return self


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
    note: str = ""  # shown under ✓: what a correct but costly form costs

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def lines(self) -> list[str]:
        if self.passed:
            out = [f"✓ {self.title}: your function agrees with {self.oracle}.", f"  Checked: {self.checked}"]
            out += [f"  Note: {self.note}"] if self.note else []
            return out + (["  The notebook uses your function from here on."] if self.fallback else [])
        if self.status == "not written":
            out = [f"… {self.title}: not written yet (the stub raises NotImplementedError)."]
            if self.fallback:
                if self.headless:
                    out.append("  Headless run: the notebook continues with mocolab's implementation, "
                               f"{self.fallback}.")
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



# ======================================================================= helpers
def _fmt(x: Any, limit: int = 8, dtype: bool = False) -> str:
    """A short printable form of a value: tensors as shape and first values.

    The dtype is shown when it is not float32, and always with ``dtype=True`` (labels, pointers: where the dtype
    may be what is wrong); so are the types of Python and NumPy numbers.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        name = str(t.dtype).replace("torch.", "")
        if t.dim() == 0:
            text = f"{t.item():.6g}" if t.is_floating_point() else str(t.item())
            return f"tensor({text}, {name})" if dtype else text
        values = t.flatten()[:limit].tolist()
        text = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values)
        more = ", …" if t.numel() > limit else ""
        shown = f", {name}" if dtype or t.dtype != torch.float32 else ""
        return f"tensor {tuple(t.shape)}{shown} [{text}{more}]"
    if isinstance(x, float):
        return f"{x!r} (a float)" if dtype else f"{x:.6g}"
    if dtype and type(x).__module__ == "numpy":
        return f"{x!r} (numpy {type(x).__name__})"
    if dtype and isinstance(x, int):
        return f"{x} ({type(x).__name__})"
    if isinstance(x, (tuple, list)) and len(x) <= 4:
        return "(" + ", ".join(_fmt(v, dtype=dtype) for v in x) + ")"
    text = repr(x)
    return text if len(text) <= 120 else text[:117] + "..."


def _close(got: Any, expected: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return False
    got = got.detach().cpu()
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


def _named(got, variants, expected, same: Callable[[Any, Any], bool]) -> str | None:
    """The mistake whose variant ``got`` matches, if the case tells it apart; ``variants``: (mistake, value or
    zero-argument callable), None or a failing callable for a variant that does not apply to the case.

    A variant that equals ``expected`` is skipped (that mistake is invisible here), and a match shared by two
    mistakes whose variants coincide names neither: a hint must be true of the case shown.
    """
    names = set()
    for mistake, value in variants:
        try:
            value = value() if callable(value) else value
        except Exception:  # a variant that cannot be computed for this case
            continue
        if value is None or (expected is not None and same(value, expected)):
            continue
        if same(got, value):
            names.add(mistake)
    return names.pop() if len(names) == 1 else None


def _diagnose(got: Any, variants, expected: torch.Tensor | None = None, rtol: float = 1e-4,
              atol: float = 1e-5) -> str | None:
    """The mistake whose output (a tensor) ``got`` matches, told apart from ``expected`` and from the others."""
    if not isinstance(got, torch.Tensor):
        return None
    return _named(got, variants, expected,
                  lambda a, b: isinstance(b, torch.Tensor) and isinstance(a, torch.Tensor) and _close(a, b, rtol, atol))


def _grad_mismatches(got: list, expected: list, rtol: float = 1e-3) -> list[int]:
    """The indices where two lists of gradients (tensors or None) differ by more than ``rtol`` of the tensor's
    largest entry plus rounding noise, 1e-5 of the largest entry of all (a bias before a BatchNorm has a gradient of
    zero plus noise)."""
    scale = max((float(e.abs().max()) for e in expected if e is not None and e.numel()), default=0.0)

    def close(g, e):
        if g is None or e is None:
            return g is None and e is None
        return g.shape == e.shape and bool((g - e).abs().max() <= rtol * e.abs().max() + 1e-5 * scale + 1e-12)
    if len(got) != len(expected):
        return [0]
    return [i for i, (g, e) in enumerate(zip(got, expected)) if not close(g, e)]


def _grads_close(got: list, expected: list) -> bool:
    return not _grad_mismatches(got, expected)


def _labels_ok(case: str, inputs: str, labels: Any, n: int, logits: torch.Tensor) -> None:
    """Labels must be (N,) zeros that F.cross_entropy takes as class indices; the failure shows their dtype."""
    expected = _fmt(torch.zeros(n, dtype=torch.long), dtype=True)
    if not isinstance(labels, torch.Tensor) or labels.shape != (n,) or bool((labels != 0).any()):
        raise _Failure(case, "labels_not_zero", inputs=inputs, expected=expected, got=_fmt(labels, dtype=True))
    try:
        F.cross_entropy(logits.detach(), labels)
    except (RuntimeError, TypeError, ValueError):
        raise _Failure(case, "labels_dtype", inputs=inputs, expected=expected, got=_fmt(labels, dtype=True)) from None


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
    """An integer pointer as an int: a Python or NumPy integer, or an integer tensor of one element; else None."""
    if isinstance(value, torch.Tensor):
        ok = value.numel() == 1 and not value.is_floating_point() and not value.is_complex()
        return int(value) if ok and value.dtype != torch.bool else None
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _is_float(value) -> bool:
    """A number that is not an integer: a Python or NumPy float, or a floating-point tensor of one element."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and value.is_floating_point()
    return isinstance(value, float) or (type(value).__module__ == "numpy" and "float" in type(value).__name__)


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


def _storage(module: nn.Module) -> tuple[list[int], list[int]]:
    """The ids of a module's Parameter objects and the addresses of their data."""
    params = list(module.parameters())
    return [id(p) for p in params], [p.data_ptr() for p in params]


#: The ✓ note of a momentum update written with ``p.data = …`` (correct, as in the official code, but costly).
DATA_NOTE = ("p.data = … allocates a new tensor per parameter at every step, and a state_dict or tensor list taken "
             "before keeps the old values; p_k.mul_(m).add_(p_q, alpha=1 - m) updates the same memory in place.")

_MODE_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def _modes(module: nn.Module) -> list[bool]:
    """The train/eval flag of every submodule whose behaviour depends on it (BatchNorm, dropout)."""
    return [sub.training for sub in module.modules() if isinstance(sub, _MODE_LAYERS)]


def _mode_text(modes: list[bool]) -> str:
    return "train mode" if all(modes) else "eval mode" if not any(modes) else "mixed train and eval modes"

"""The machinery every checker shares: failures, the answer block, headless detection, comparisons."""

from __future__ import annotations

import html
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .mistakes import MISTAKES

__all__ = ["CheckResult", "is_headless"]


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

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

``MOCOLAB_SOLUTIONS=FILE.py`` makes a stub that is not written yet take ``FILE.py``'s function of the
same name (checked like any other), so that a headless run goes the learner's way through a notebook.

``python -m mocolab.exercises FILE.py`` runs every checker against the functions of the
same names in ``FILE.py`` and exits with status 1 if one fails (``make solutions`` does
this for ``notebooks/solutions/solutions.py``).

Every check runs on the CPU with its own seed, inside :func:`torch.random.fork_rng`: it
leaves the notebook's random state as it found it.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..momentum import momentum_update as _momentum_update
from .core import CheckResult, _error_text, _Failure, _fmt, _NotWritten, _show, is_headless
from .losses import (
    _check_chance_loss,
    _check_infonce,
    _check_margin_loss,
    _lib_chance_loss,
    _lib_infonce,
    _lib_margin_loss,
)
from .mistakes import MISTAKES
from .moco_step import (
    _check_moco_step,
    _check_momentum_update,
    _check_shuffled_keys,
    _lib_moco_step,
    _lib_shuffled_keys,
)
from .negatives import _check_bank_update, _check_enqueue, _lib_bank_update, _lib_enqueue
from .temperature import half_mass_temperature, temperature_for_mass
from .use import announce, is_yours

__all__ = ["check", "run_check", "is_headless", "CheckResult", "Exercise", "EXERCISES", "MISTAKES",
           "temperature_for_mass", "half_mass_temperature", "main", "announce", "is_yours"]


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
            result.note = getattr(result.checked, "note", "")
            result.checked = str(result.checked)
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
    if result.status == "not written" and _stand_in(name) is not None:
        fn = _stand_in(name)
        result = run_check(name, fn)
    result.headless = is_headless()
    result.fallback = f"{ex.oracle}" if not result.passed else "yours"
    if show:
        _show(result)
    return fn if result.passed else ex.library


_SOLUTIONS: dict[str, object] = {}


def _stand_in(name: str):
    """``MOCOLAB_SOLUTIONS=FILE.py``: ``FILE.py``'s function ``name``, which stands in for a stub not written yet, so
    that a headless run takes the learner's path through a notebook (the tests use it); None when unset."""
    path = os.environ.get("MOCOLAB_SOLUTIONS", "").strip()
    if not path:
        return None
    if path not in _SOLUTIONS:
        _SOLUTIONS[path] = _load(Path(path))
    return getattr(_SOLUTIONS[path], name)


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


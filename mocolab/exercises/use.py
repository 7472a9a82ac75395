"""Which implementation a run uses after an exercise: the learner's function, or the library's stand-in."""

from __future__ import annotations

__all__ = ["is_yours", "announce"]


def is_yours(name: str, fn) -> bool:
    """True when ``fn`` is the learner's function for exercise ``name``, not the library's stand-in.

    :func:`mocolab.exercises.check` returns the learner's function when it passed and the library's
    (``EXERCISES[name].library``) otherwise; this tells the two apart.
    """
    from . import EXERCISES, _exercise

    _exercise(name)
    return fn is not None and fn is not EXERCISES[name].library


def announce(name: str, fn, what: str = "the next run") -> bool:
    """Print which ``name`` function ``what`` uses (yours or mocolab's); return :func:`is_yours`."""
    from . import EXERCISES

    yours = is_yours(name, fn)
    who = f"your {name}" if yours else f"mocolab's {name} ({EXERCISES[name].oracle})"
    print(f"{what[:1].upper()}{what[1:]} uses {who}.", flush=True)
    return yours

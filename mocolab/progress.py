"""Progress bars for long loops, quiet in CI.

Every long loop in the library and the notebooks goes through
:func:`progress`, so one switch silences them all: set the environment
variable ``CI`` (to anything truthy) or ``MOCOLAB_QUIET`` and the bars are
disabled. In JupyterLab ``tqdm.auto`` draws a widget bar; in a terminal a
text bar.

Example::

    from mocolab.progress import progress
    for images, labels in progress(loader, desc="epoch 1"):
        ...
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TypeVar

__all__ = ["progress", "progress_disabled"]

T_ = TypeVar("T_")

_FALSY = {"", "0", "false", "no", "off"}


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in _FALSY


def progress_disabled() -> bool:
    """Whether progress bars are switched off by the environment.

    Returns:
        True when ``CI`` is set to a truthy value (anything but ``""``, ``0``,
        ``false``, ``no``, ``off``) or ``MOCOLAB_QUIET`` is set likewise.
    """
    return _truthy(os.environ.get("CI")) or _truthy(os.environ.get("MOCOLAB_QUIET"))


def progress(iterable: Iterable[T_] | None = None, **kwargs):
    """Wrap ``iterable`` in a ``tqdm.auto.tqdm`` progress bar.

    Args:
        iterable: anything iterable (a DataLoader, ``range(epochs)``, ...).
            May be None when ``total=`` is given and the bar is advanced by
            hand with ``.update()``.
        **kwargs: passed to ``tqdm`` (``desc``, ``total``, ``leave``, ...).
            ``disable=True`` forces the bar off; the environment switches
            ``CI`` / ``MOCOLAB_QUIET`` turn it off too.

    Returns:
        A ``tqdm`` object: iterate over it as over ``iterable``; it also has
        ``set_postfix`` / ``update`` / ``close`` (all no-ops when disabled).
    """
    from tqdm.auto import tqdm

    kwargs["disable"] = bool(kwargs.get("disable", False)) or progress_disabled()
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)

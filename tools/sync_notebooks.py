#!/usr/bin/env python
"""Generate ``notebooks/*.ipynb`` from their jupytext sources ``notebooks/*.py``.

The ``.py`` file (jupytext percent format) is the source a notebook author
edits; the ``.ipynb`` beside it is generated, never edited by hand:

* no outputs and no execution counts;
* deterministic cell ids, derived from the notebook name and the cell index,
  so regenerating an unchanged source gives a byte-identical file;
* kernelspec ``python3``, so Jupyter and papermill run it with whichever
  Python the environment provides;
* no jupytext version metadata, so the file does not change with the
  jupytext release.

Usage::

    python tools/sync_notebooks.py            # write every out-of-date .ipynb
    python tools/sync_notebooks.py --check    # report out-of-sync pairs, exit 1 if any
    python tools/sync_notebooks.py notebooks/05_momentum_encoder.py   # only these
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import jupytext
import nbformat

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"name": "python"}


def cell_id(name: str, index: int) -> str:
    """Deterministic nbformat cell id for cell ``index`` of notebook ``name``."""
    return hashlib.sha1(f"{name}:{index}".encode()).hexdigest()[:12]


def convert(source: Path) -> str:
    """Return the ``.ipynb`` JSON text generated from the jupytext file ``source``.

    Raises:
        ValueError: if the source cannot be parsed as a jupytext percent script.
    """
    text = source.read_text(encoding="utf-8")
    try:
        nb = jupytext.reads(text, fmt="py:percent")
    except Exception as exc:  # jupytext raises a variety of errors
        raise ValueError(f"{source}: not a valid jupytext percent script: {exc}") from exc
    nb.nbformat, nb.nbformat_minor = 4, 5
    nb.metadata = nbformat.from_dict({"kernelspec": KERNELSPEC, "language_info": LANGUAGE_INFO})
    for index, cell in enumerate(nb.cells):
        cell.id = cell_id(source.stem, index)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nbformat.validate(nb)
    return nbformat.writes(nb) + "\n"


def pairs(paths: list[Path] | None = None) -> list[tuple[Path, Path]]:
    """(source .py, generated .ipynb) pairs for the given sources or all notebooks."""
    sources = paths if paths else sorted(NOTEBOOK_DIR.glob("*.py"))
    return [(src, src.with_suffix(".ipynb")) for src in sources]


def out_of_sync(paths: list[Path] | None = None) -> list[str]:
    """Describe every notebook pair that differs from what :func:`convert` would write.

    Also reports ``.ipynb`` files that have no ``.py`` source.
    """
    problems = []
    for src, dst in pairs(paths):
        if not dst.exists():
            problems.append(f"{dst.name}: missing (generated from {src.name})")
        elif dst.read_text(encoding="utf-8") != convert(src):
            problems.append(f"{dst.name}: differs from what {src.name} generates")
    if not paths:
        for nb in sorted(NOTEBOOK_DIR.glob("*.ipynb")):
            if not nb.with_suffix(".py").exists():
                problems.append(f"{nb.name}: has no source {nb.with_suffix('.py').name}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="*", type=Path, help="jupytext .py files (default: notebooks/*.py)")
    parser.add_argument("--check", action="store_true", help="only report out-of-sync pairs; exit 1 if any")
    args = parser.parse_args(argv)
    sources = [p.resolve() for p in args.sources] or None

    if args.check:
        problems = out_of_sync(sources)
        for line in problems:
            print(f"out of sync: {line}")
        if problems:
            print("Run `make notebooks` to regenerate the .ipynb files.")
            return 1
        print(f"{len(pairs(sources))} notebook(s) in sync")
        return 0

    for src, dst in pairs(sources):
        text = convert(src)
        if dst.exists() and dst.read_text(encoding="utf-8") == text:
            continue
        dst.write_text(text, encoding="utf-8")
        print(f"wrote {dst.relative_to(REPO) if dst.is_relative_to(REPO) else dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

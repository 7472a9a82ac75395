"""Load a repository script (tools/, benchmarks/, notebooks/solutions/) as a module, for its tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str, name: str | None = None) -> ModuleType:
    """Execute ``REPO/relative_path`` as a module named ``name`` (default: the file's stem) and return it.

    The module is registered in ``sys.modules`` first, as ``dataclasses`` and ``pickle`` look modules up there.
    """
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module

"""The exercises in the course: each notebook has its stub and its check, `make solutions` runs the checkers,
the README marks the notebooks with exercises, and the tour and the notebook tests run them headless."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mocolab.exercises import EXERCISES

REPO = Path(__file__).resolve().parents[2]


def test_the_tour_and_the_notebook_tests_run_headless():
    from test_notebooks import KERNEL_ENV

    assert KERNEL_ENV["MOCOLAB_HEADLESS"] == "1"
    assert 'os.environ.setdefault("MOCOLAB_HEADLESS", "1")' in (REPO / "tools" / "tour.py").read_text()



def test_make_solutions_runs_the_checkers(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("GNU make is not installed")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\n")
    (venv / ".mocolab-setup.stamp").touch()
    plan = subprocess.run(["make", "-n", "solutions", f"VENV={venv}"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout
    assert f"{venv}/bin/python -m mocolab.exercises notebooks/solutions/solutions.py" in plan
    help_text = subprocess.run(["make", "help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "make solutions" in help_text


NOTEBOOK_OF = {"01": "01_margin_contrastive_loss", "02": "02_npair_and_infonce", "03": "03_memory_bank",
               "04": "04_queue_without_momentum", "05": "05_momentum_encoder", "06": "06_shuffle_bn",
               "07": "07_moco_full"}


@pytest.mark.parametrize("name", list(EXERCISES))
def test_notebook_cell_has_the_stub_and_the_check(name):
    source = (REPO / "notebooks" / f"{NOTEBOOK_OF[EXERCISES[name].notebook]}.py").read_text()
    cells = source.split("# %%")
    cell = next((c for c in cells if f'exercises.check("{name}"' in c), None)
    assert cell is not None, f"no cell calls exercises.check({name!r})"
    assert re.search(rf"def {name}\(", cell) and "raise NotImplementedError" in cell


def test_notebook_02_has_the_widget_exercise():
    source = (REPO / "notebooks" / "02_npair_and_infonce.py").read_text()
    assert "exercises.half_mass_temperature(" in source


def test_readme_marks_the_exercises():
    readme = (REPO / "README.md").read_text()
    assert "make solutions" in readme
    for stem in NOTEBOOK_OF.values():
        row = next(line for line in readme.splitlines() if line.startswith(f"| [`{stem}`]"))
        assert "✎" in row, row

"""Notebooks 01–03 run their experiments with the learner's functions once the exercises pass.

With ``MOCOLAB_SOLUTIONS`` the stubs take the reference solutions, so a headless run goes the learner's way:
the margin run trains with ``margin_loss`` (01), every MoCo model computes its logits with ``infonce`` and the
loss at initialisation is set beside ``chance_loss`` (02), and both bank runs write the bank with
``bank_update`` (03). A correct function must give the numbers of the library's stand-in: the models of
:mod:`mocolab.exercises.wrap_losses` are checked at that level first (a few steps), then each notebook at CI size
through papermill, once each way.
"""
from __future__ import annotations

import json
import math
import os
from functools import partial
from pathlib import Path

import nbformat
import pytest
import torch
from test_notebooks import (
    CI_PARAMETERS,
    KERNEL_ENV,
    _timeout,
    execute,
    python3_kernel,  # noqa: F401  (a fixture: pytest finds it here)
)

import mocolab
from mocolab.exercises import EXERCISES, wrap_losses
from mocolab.train import TrainConfig, fit
from tests.scripts import load_script

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SOLUTIONS = REPO / "notebooks" / "solutions" / "solutions.py"


@pytest.fixture(scope="module")
def solutions():
    return load_script("notebooks/solutions/solutions.py", "solutions_for_the_learner_path")


@pytest.fixture(scope="module")
def images():
    x, _, _ = mocolab.load_images("shapes", "train", limit=96)
    return x


ENCODER = partial(mocolab.ConvNet, width=4)
BUILDERS = {
    "margin_loss": (lambda fn: wrap_losses.margin_pairs(fn, ENCODER, dim=16, margin=1.0),
                    mocolab.MarginPairs, wrap_losses.MarginPairsWith),
    "infonce": (lambda fn: wrap_losses.moco(fn, ENCODER, dim=16, K=48, m=0.9, T=0.2),
                mocolab.MoCo, wrap_losses.MoCoWith),
    "bank_update": (lambda fn: wrap_losses.memory_bank_model(fn, ENCODER, 96, dim=16, K=32, T=0.1),
                    mocolab.MemoryBankModel, wrap_losses.MemoryBankModelWith),
}


def _train(build, images):
    torch.manual_seed(0)
    model = build()
    hist = fit(model, images, mocolab.BatchAugment(32), TrainConfig(epochs=1, batch_size=32, knn_every=0, seed=0),
               device="cpu", verbose=False)
    return model, hist["step_loss"], torch.randn(())  # the draw after training: the same random stream?


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_the_learners_function_trains_the_librarys_model(name, solutions, images):
    build, library_class, wrapper_class = BUILDERS[name]
    theirs, theirs_loss, theirs_next = _train(lambda: build(EXERCISES[name].library), images)
    yours, yours_loss, yours_next = _train(lambda: build(getattr(solutions, name)), images)
    assert type(theirs) is library_class, "the library's stand-in must build the library's own model"
    assert isinstance(yours, wrapper_class) and isinstance(yours, library_class)
    assert torch.equal(theirs_next, yours_next), "building and training must draw the same random numbers"
    assert yours_loss == pytest.approx(theirs_loss, rel=1e-5, abs=1e-5)
    theirs_state, yours_state = theirs.state_dict(), yours.state_dict()
    assert theirs_state.keys() == yours_state.keys()
    for key, value in theirs_state.items():
        torch.testing.assert_close(yours_state[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_the_wrappers_call_the_learners_function(images):
    calls = []

    def spy(name):
        def fn(*args):
            calls.append(name)
            return EXERCISES[name].library(*args)
        return fn

    for name, (build, _, wrapper_class) in BUILDERS.items():
        model = build(spy(name))
        assert isinstance(model, wrapper_class)
        x = images[:8].float() / 255
        logits, labels = model(x, x, index=torch.arange(8))
        model.loss(logits, labels)
        assert name in calls, f"the {name} model never called the learner's function"


# ----------------------------------------------------------------- the notebooks, both ways, at CI size
NOTEBOOKS = {"01_margin_contrastive_loss": ("margin_loss",), "02_npair_and_infonce": ("chance_loss", "infonce"),
             "03_memory_bank": ("bank_update",)}
RUN_DEPENDENT = {"seconds", "cpu_seconds", "train_seconds", "headline_effects"}


def _run(stem: str, out: Path, monkeypatch, kernel: str, solutions: bool) -> tuple[dict, str]:
    for key, value in KERNEL_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if solutions:
        monkeypatch.setenv("MOCOLAB_SOLUTIONS", str(SOLUTIONS))
    else:
        monkeypatch.delenv("MOCOLAB_SOLUTIONS", raising=False)
    out.mkdir()
    executed = execute(REPO / "notebooks" / f"{stem}.ipynb", out, CI_PARAMETERS[stem], kernel, _timeout(stem))
    cells = nbformat.read(executed, as_version=4).cells
    text = "\n".join(o.get("text", "") for cell in cells for o in cell.get("outputs", [])
                     if o.get("output_type") == "stream")
    return json.loads((out / "metrics.json").read_text()), text


def _numbers(value, path=""):
    """The numeric leaves of a metrics dict, by their path."""
    if isinstance(value, dict):
        for key, v in value.items():
            yield from _numbers(v, f"{path}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, float(value)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("stem", list(NOTEBOOKS))
def test_the_notebook_gives_the_same_numbers_on_the_learners_path(stem, tmp_path, monkeypatch,
                                                                   python3_kernel):  # noqa: F811
    library, library_text = _run(stem, tmp_path / "library", monkeypatch, python3_kernel, solutions=False)
    yours, yours_text = _run(stem, tmp_path / "yours", monkeypatch, python3_kernel, solutions=True)
    for name in NOTEBOOKS[stem]:
        if name != "chance_loss":
            assert f"uses mocolab's {name}" in library_text and f"uses your {name}" not in library_text, name
            assert f"uses your {name}" in yours_text and f"uses mocolab's {name}" not in yours_text, name
    assert library.keys() == yours.keys()
    a = {k: v for k, v in library.items() if k not in RUN_DEPENDENT}
    b = {k: v for k, v in yours.items() if k not in RUN_DEPENDENT}
    a_numbers, b_numbers = dict(_numbers(a)), dict(_numbers(b))
    assert a_numbers.keys() == b_numbers.keys()
    differ = {k: (a_numbers[k], b_numbers[k]) for k in a_numbers
              if not math.isclose(a_numbers[k], b_numbers[k], rel_tol=1e-4, abs_tol=1e-4)}
    assert not differ, f"the learner's path changed these numbers (library, yours): {differ}"
    assert [e["holds"] for e in library["headline_effects"]] == [e["holds"] for e in yours["headline_effects"]]

"""The learner's functions train the course's models (mocolab.exercises.wrap_moco), and the notebooks use them.

The reference solutions (notebooks/solutions/solutions.py) stand in for the learner: their pieces inside MoCo
(notebooks 04-06) and their whole moco_step (notebook 07) must train as mocolab.MoCo does. Then notebooks 04-07
run at CI size the learner's way (MOCOLAB_SOLUTIONS), and their metrics say that the learner's functions ran.
"""
from __future__ import annotations

import json
import os
from functools import partial

import pytest
import torch
from test_notebooks import CI_PARAMETERS, KERNEL_ENV, NOTEBOOK_DIR, execute, python3_kernel  # noqa: F401

from mocolab import BatchAugment, ConvNet, MoCo, load_images
from mocolab.exercises import EXERCISES
from mocolab.exercises.wrap_moco import MoCoFromPieces, MoCoFromStep, train_side_by_side, your_moco
from mocolab.pretrain import build_model, load_pretrain_data, resolve_config
from mocolab.train import TrainConfig
from tests.scripts import REPO, load_script

SOLUTIONS = "notebooks/solutions/solutions.py"


@pytest.fixture(scope="module")
def solutions():
    return load_script(SOLUTIONS, "_solutions_for_wrap_moco")


def _small_moco(cls=MoCo, **kwargs):
    torch.manual_seed(0)
    return cls(partial(ConvNet, width=4), dim=8, K=20, m=0.9, T=0.2, shuffle_bn="split", bn_splits=2, **kwargs)


def test_your_moco_is_plain_moco_without_the_learners_functions(solutions):
    library = {name: EXERCISES[name].library for name in ("enqueue", "momentum_update", "shuffled_keys")}
    model = your_moco(partial(ConvNet, width=4), dim=8, K=20, **library)
    assert type(model) is MoCo
    assert type(your_moco(partial(ConvNet, width=4), dim=8, K=20)) is MoCo
    mixed = your_moco(partial(ConvNet, width=4), dim=8, K=20, enqueue=solutions.enqueue,
                      momentum_update=library["momentum_update"])
    assert type(mixed) is MoCoFromPieces and list(mixed.pieces) == ["enqueue"]


def test_the_pieces_are_called_and_train_like_moco(solutions):
    calls = {"enqueue": 0, "momentum_update": 0, "shuffled_keys": 0}

    def counted(name):
        def fn(*args):
            calls[name] += 1
            return getattr(solutions, name)(*args)
        return fn

    pieces = _small_moco(MoCoFromPieces, **{name: counted(name) for name in calls})
    moco = _small_moco()
    gen = torch.Generator().manual_seed(1)
    for step in range(5):  # 5 batches of 6: the queue of 20 wraps around
        im_q, im_k = torch.randn(6, 3, 8, 8, generator=gen), torch.randn(6, 3, 8, 8, generator=gen)
        index = torch.arange(6 * step, 6 * step + 6)
        torch.manual_seed(step)
        got, _ = pieces(im_q, im_k, index)
        torch.manual_seed(step)
        expected, _ = moco(im_q, im_k, index)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert calls == {"enqueue": 5, "momentum_update": 5, "shuffled_keys": 5}
    torch.testing.assert_close(pieces.queue, moco.queue, rtol=0, atol=1e-5)
    for name in ("queue_ptr", "queue_filled", "queue_index", "queue_step", "queue_count"):
        assert torch.equal(getattr(pieces, name), getattr(moco, name)), name


def test_moco_from_step_takes_over_the_moco_and_refuses_other_steps(solutions):
    moco = _small_moco()
    model = MoCoFromStep(solutions.moco_step, moco)
    assert model.encoder_q is moco.encoder_q and model.queue is moco.queue
    assert set(model.state_dict()) == {k for k in moco.state_dict() if not k.startswith("queue_")} | {"queue_ptr"}
    logits, labels = model(torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8))
    assert logits.shape == (6, 21) and int(model.queue_ptr) == 6 and not bool(labels.any())
    with pytest.raises(ValueError, match="symmetric"):
        MoCoFromStep(solutions.moco_step, _small_moco(symmetric=True))


@pytest.mark.slow
def test_the_reference_moco_step_trains_like_moco(solutions):
    """Notebook 07's side-by-side run at its CI size: the reference step and mocolab.MoCo give the same numbers."""
    params = CI_PARAMETERS["07_moco_full"]
    recipe = resolve_config("cifar10-colab", data="shapes", arch="convnet", limit=params["NUM_IMAGES"],
                            batch_size=params["BATCH_SIZE"], K=params["K"], bn_splits=2, seed=0, device="cpu")
    torch.manual_seed(0)
    images, eval_data = load_pretrain_data(recipe, verbose=False)
    augment = BatchAugment(image_size=images.shape[-1], preset=recipe["augment"])
    config = TrainConfig(epochs=1, batch_size=params["BATCH_SIZE"], lr=recipe["lr"], schedule=recipe["schedule"],
                         weight_decay=recipe["weight_decay"], knn_every=0, seed=0)
    for step, exact in ((solutions.moco_step, False), (EXERCISES["moco_step"].library, True)):
        side = train_side_by_side(step, lambda: build_model(recipe), images, augment, config, seed=0,
                                  eval_data=eval_data, device="cpu")
        assert isinstance(side.step_model, MoCoFromStep) and side.step_model.moco_step is step
        assert len(side.step_differences) == len(side.moco_logits) == params["NUM_IMAGES"] // params["BATCH_SIZE"]
        assert side.step_history["knn_acc"] == side.moco_history["knn_acc"]
        assert side.same_pointer
        if exact:  # the library's own step: the same operations in the same order
            assert side.max_step_difference == side.max_logit_difference == side.max_queue_difference == 0.0
        else:  # float rounding only (logits of about 10)
            assert side.max_step_difference < 1e-4 and side.max_logit_difference < 1e-3, side.step_differences
            torch.testing.assert_close(side.step_model.queue, side.moco.queue, rtol=0, atol=1e-5)
            assert side.step_history["loss"] == pytest.approx(side.moco_history["loss"], abs=1e-4)


def test_a_step_that_does_not_shuffle_is_told_apart(solutions):
    """Under split BN, keys without the shuffle are not MoCo's: the difference is far above rounding."""

    def unshuffled(encoder_q, encoder_k, queue, ptr, im_q, im_k, m, T):
        solutions.momentum_update(encoder_k, encoder_q, m)
        with torch.no_grad():
            k = torch.nn.functional.normalize(encoder_k(im_k), dim=1)
        q = torch.nn.functional.normalize(encoder_q(im_q), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.clone()], dim=1) / T
        return logits, torch.zeros(len(q), dtype=torch.long), solutions.enqueue(queue, ptr, k)

    images, labels, _ = load_images("shapes", "train", limit=64, seed=0)
    config = TrainConfig(epochs=1, batch_size=32, lr=0.06, knn_every=0, seed=0)
    side = train_side_by_side(unshuffled, lambda: _small_moco(), images, BatchAugment(32), config, seed=0,
                              device="cpu")
    assert side.max_step_difference > 1e-2, side.step_differences


# ---------------------------------------------------------------------------- notebooks, the learner's way

LEARNER_FLAGS = {"04_queue_without_momentum": "your_enqueue", "05_momentum_encoder": "your_momentum_update",
                 "06_shuffle_bn": "your_shuffled_keys"}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stem", [*LEARNER_FLAGS, "07_moco_full"])
def test_notebook_runs_on_the_learners_functions(stem, tmp_path, monkeypatch, python3_kernel):  # noqa: F811
    for key, value in KERNEL_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MOCOLAB_SOLUTIONS", str(REPO / SOLUTIONS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    parameters = {**CI_PARAMETERS[stem], **({"COMPARE": False} if stem == "07_moco_full" else {})}
    executed = execute(NOTEBOOK_DIR / f"{stem}.ipynb", tmp_path, parameters, python3_kernel, 600)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    text = executed.read_text()
    if stem in LEARNER_FLAGS:
        name = LEARNER_FLAGS[stem].removeprefix("your_")
        assert metrics[LEARNER_FLAGS[stem]] is True
        assert f"uses your {name}." in text, f"{stem} does not say that it runs on the learner's {name}"
        return
    ours = metrics["your_moco"]
    assert ours["yours"] is True and "uses your moco_step." in text
    assert ours["steps"] == CI_PARAMETERS[stem]["NUM_IMAGES"] // CI_PARAMETERS[stem]["BATCH_SIZE"]
    assert ours["knn_acc"] == ours["mocolab_knn_acc"] and ours["same_pointer"]
    assert 0.0 < ours["max_step_logit_difference"] < 1e-4 and ours["max_logit_difference"] < 1e-3, ours

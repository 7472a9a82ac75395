"""mocolab.lesson: the verdicts on headline effects, and the metrics file of a notebook run."""
from __future__ import annotations

import json

import pytest

from mocolab import accuracy_noise
from mocolab.lesson import EFFECTS, Lesson, at_least, at_most, beats, best_inside, judge_effects, within


def test_beats_needs_more_than_the_band():
    band = accuracy_noise(20.0, 1000)
    effect = beats("a", "b", "a beats b")
    assert effect.check({"a": 20.0 + band + 0.01, "b": 20.0, "num_test": 1000})[0]
    assert not effect.check({"a": 20.0 + band - 0.01, "b": 20.0, "num_test": 1000})[0]
    assert not effect.check({"a": 10.0, "b": 20.0, "num_test": 1000})[0]
    # fewer test images, wider band: the same difference no longer counts
    assert not effect.check({"a": 20.0 + band + 0.01, "b": 20.0, "num_test": 100})[0]


def test_nested_keys_and_sweeps():
    m = {"num_test": 1000, "sweep": {"0": {"acc": 15.0}, "0.99": {"acc": 50.0}}}
    assert beats(("sweep", "0.99", "acc"), ("sweep", "0", "acc"), "x").check(m)[0]
    assert best_inside("t", "x").check({"t": {"0.05": 30, "0.1": 40, "0.5": 20}})[0]
    assert not best_inside("t", "x").check({"t": {"0.05": 50, "0.1": 40, "0.5": 20}})[0]


def test_thresholds():
    assert at_least("a", "b", offset=5.0, claim="x").check({"a": 15.0, "b": 10.0})[0]
    assert not at_least("a", "b", offset=5.0, claim="x").check({"a": 14.9, "b": 10.0})[0]
    assert not at_least("a", "b", strict=True, claim="x").check({"a": 10.0, "b": 10.0})[0]
    assert at_most("a", "b", scale=0.5, claim="x").check({"a": 0.05, "b": 0.1})[0]
    assert not at_most("a", "b", scale=0.5, claim="x").check({"a": 0.051, "b": 0.1})[0]
    assert within("a", "b", rel=0.05, claim="x").check({"a": 6.5, "b": 6.24})[0]
    assert not within("a", "b", rel=0.05, claim="x").check({"a": 6.6, "b": 6.24})[0]


def test_missing_key_is_not_measured_never_holds():
    verdicts = judge_effects("07_moco_full", {"num_test": 100})
    assert verdicts and all(not v["holds"] and "not measured" in v["detail"] for v in verdicts)


def test_every_notebook_with_a_lesson_has_effects():
    assert sorted(EFFECTS) == [f"{i:02d}" for i in range(1, 11)]
    assert judge_effects("00_setup_and_data", {}) == []


def test_finish_writes_metrics_with_sizes_and_verdicts(tmp_path):
    lesson = Lesson("07_moco_full", tmp_path / "out", seed=3, device="cpu")
    metrics = lesson.finish({"knn_acc": 60.0, "random_init_knn_acc": 20.0, "num_train": 500, "num_test": 1000},
                            verbose=False)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved == metrics
    assert saved["seed"] == 3 and saved["device"] == "cpu" and saved["seconds"] >= 0
    assert saved["headline_effects"] == [{"claim": "MoCo beats its random init (kNN)", "holds": True,
                                          "detail": saved["headline_effects"][0]["detail"]}]


def test_finish_needs_the_sizes(tmp_path):
    lesson = Lesson("07_moco_full", tmp_path, device="cpu")
    with pytest.raises(ValueError, match="num_train"):
        lesson.finish({"knn_acc": 50.0}, verbose=False)


def test_load_records_the_sizes(tmp_path):
    lesson = Lesson("04_queue", tmp_path, device="cpu")
    x_train, y_train, x_test, y_test, classes = lesson.load("shapes", 40, 20)
    assert (lesson.num_train, lesson.num_test) == (40, 20) == (len(x_train), len(x_test))
    assert len(classes) == 10 and x_train.dtype.is_floating_point is False


def test_parameter_errors_name_the_notebook_parameter(tmp_path):
    from mocolab.lesson import check_parameters

    lesson = Lesson("04_queue", tmp_path, device="cpu")
    with pytest.raises(ValueError, match=r"notebook parameter NUM_TRAIN = 0: expected a positive integer"):
        lesson.load("shapes", 0, 20)
    with pytest.raises(ValueError, match=r"notebook parameter NUM_EVAL = -5"):
        lesson.load("shapes", 40, -5, names={"num_train": "NUM_IMAGES", "num_test": "NUM_EVAL"})
    with pytest.raises(ValueError, match=r"notebook parameter IMAGE_SIZE = 4: expected an integer >= 8"):
        lesson.load("shapes", 40, 20, image_size=4)
    with pytest.raises(ValueError, match=r"notebook parameter DATASET = 'mnist': unknown dataset"):
        lesson.load("mnist", 40, 20)
    with pytest.raises(ValueError, match=r"notebook parameter AUGMENTATION = 'v3': expected one of 'v1', 'v2'"):
        check_parameters(NUM_IMAGES=None, AUGMENTATION="v3")
    with pytest.raises(ValueError, match=r"notebook parameter T = inf: expected a finite number > 0"):
        check_parameters(T=float("inf"))
    check_parameters(NUM_IMAGES=5000, NUM_TEST=1000, IMAGE_SIZE=32, AUGMENTATION="v2", EPOCHS=1, K=64, SEED=0)

"""mocolab.lesson: the verdicts on headline effects, and the metrics file of a notebook run."""
from __future__ import annotations

import json

import pytest

from mocolab import accuracy_noise
from mocolab.lesson import (
    AT_SCALE,
    EFFECTS,
    Lesson,
    at_least,
    at_most,
    beats,
    best_inside,
    judge_effects,
    keys_below,
    largest_beats_smallest,
    within,
)


def test_beats_needs_more_than_the_band():
    band = accuracy_noise(20.0, 1000)
    effect = beats("a", "b", "a beats b", names=("A", "B"))
    assert effect.check({"a": 20.0 + band + 0.01, "b": 20.0, "num_test": 1000})[0]
    assert not effect.check({"a": 20.0 + band - 0.01, "b": 20.0, "num_test": 1000})[0]
    assert not effect.check({"a": 10.0, "b": 20.0, "num_test": 1000})[0]
    # fewer test images, wider band: the same difference no longer counts
    assert not effect.check({"a": 20.0 + band + 0.01, "b": 20.0, "num_test": 100})[0]


def test_nested_keys_and_sweeps():
    m = {"num_test": 1000, "sweep": {"0": {"acc": 15.0}, "0.99": {"acc": 50.0}}}
    assert beats(("sweep", "0.99", "acc"), ("sweep", "0", "acc"), "x", names=("A", "B")).check(m)[0]
    assert best_inside("t", "x", x="T").check({"t": {"0.05": 30, "0.1": 40, "0.5": 20}})[0]
    assert not best_inside("t", "x", x="T").check({"t": {"0.05": 50, "0.1": 40, "0.5": 20}})[0]


def test_thresholds():
    ab = {"names": ("A", "B")}
    assert at_least("a", "b", offset=5.0, claim="x", **ab).check({"a": 15.0, "b": 10.0})[0]
    assert not at_least("a", "b", offset=5.0, claim="x", **ab).check({"a": 14.9, "b": 10.0})[0]
    assert not at_least("a", "b", strict=True, claim="x", **ab).check({"a": 10.0, "b": 10.0})[0]
    assert at_most("a", "b", scale=0.5, claim="x", **ab).check({"a": 0.05, "b": 0.1})[0]
    assert not at_most("a", "b", scale=0.5, claim="x", **ab).check({"a": 0.051, "b": 0.1})[0]
    assert within("a", "b", rel=0.05, claim="x", **ab).check({"a": 6.5, "b": 6.24})[0]
    assert not within("a", "b", rel=0.05, claim="x", **ab).check({"a": 6.6, "b": 6.24})[0]


def _detail(effect, metrics):
    return effect.check(metrics)[1]


def test_accuracy_verdicts_name_both_sides_the_difference_and_the_band():
    moco = beats("moco", "init", "c", names=("MoCo kNN", "random init"))
    band = accuracy_noise(21.1, 400)  # 5.77 points
    assert _detail(moco, {"moco": 54.6, "init": 21.1, "num_test": 400}) == (
        f"MoCo kNN 54.6 % vs random init 21.1 %: +33.5 points, beyond the noise band of ±{band:.1f} points")
    assert _detail(moco, {"moco": 23.1, "init": 21.1, "num_test": 400}) == (
        f"MoCo kNN 23.1 % vs random init 21.1 %: +2.0 points, inside the noise band of ±{band:.1f} points")
    assert _detail(moco, {"moco": 11.1, "init": 21.1, "num_test": 400}) == (
        f"MoCo kNN 11.1 % vs random init 21.1 %: −10.0 points, the other way, beyond the noise band of ±{band:.1f} "
        "points")
    holds, _, values = moco.check({"moco": 54.6, "init": 21.1, "num_test": 400})
    assert holds and values == {"MoCo kNN": 54.6, "random init": 21.1, "noise band": band}
    sweep = largest_beats_smallest("s", "c", x="K")
    assert _detail(sweep, {"s": {"1024": 54.5, "4": 22.7, "64": 61.3}, "num_test": 1000}).startswith(
        "kNN 54.5 % at K = 1024 vs 22.7 % at K = 4: +31.8 points, beyond the noise band of ±3.7 points")


def test_threshold_verdicts_give_units_and_the_margin_in_words():
    steps = at_least("steps", offset=300, claim="c", names=("training steps",))
    assert _detail(steps, {"steps": 496}) == "training steps 496, at least the 300 required"
    assert _detail(steps, {"steps": 1240}) == "training steps 1,240, at least the 300 required"
    assert _detail(steps, {"steps": 290}) == "training steps 290, below the 300 required"
    cheat = at_least("a", "b", offset=5.0, claim="c", names=("pretext accuracy without the shuffle", "with it"),
                     unit="%")
    assert _detail(cheat, {"a": 11.23, "b": 4.492}) == (
        "pretext accuracy without the shuffle 11.2 % vs with it 4.5 %: +6.7 points, at least the 5.0 points required")
    assert _detail(cheat, {"a": 8.0, "b": 4.5}).endswith(": +3.5 points, short of the 5.0 points required")
    memory = at_least("a", "b", strict=True, claim="c", names=("memory bank", "queue"), unit="bytes")
    assert _detail(memory, {"a": 2_560_000, "b": 524_288}) == (
        "memory bank 2.56 MB vs queue 0.524 MB: +2.04 MB, above zero, as required")
    assert _detail(memory, {"a": 1e6, "b": 1e6}).endswith("+0 MB, not above zero, which is required")
    spread = at_most("a", "b", scale=0.5, claim="c", names=("feature std without negatives", "with them"))
    assert _detail(spread, {"a": 0.006, "b": 0.069}) == (
        "feature std without negatives 0.006 vs with them 0.069: 0.087 times as much, within the 0.5 times allowed")
    assert _detail(spread, {"a": 0.06, "b": 0.069}).endswith("0.87 times as much, above the 0.5 times allowed")
    loss = within("a", "b", rel=0.05, claim="c", names=("loss at init", "ln(K+1)"))
    assert _detail(loss, {"a": 6.67, "b": 6.93}) == "loss at init 6.67 vs ln(K+1) 6.93: −3.8 %, inside the ±5 % allowed"
    assert _detail(loss, {"a": 7.5, "b": 6.93}).endswith("+8.2 %, outside the ±5 % allowed")


def test_sweep_verdicts_name_the_swept_parameter():
    temps = {"t": {"0.05": 22.1, "0.2": 54.5, "0.5": 41.8}}
    assert _detail(best_inside("t", "c", x="T"), temps) == (
        "kNN best at T = 0.2 (54.5 %) of T = 0.05, 0.2, 0.5: inside the swept range")
    temps["t"]["0.5"] = 60.0
    assert _detail(best_inside("t", "c", x="T"), temps).endswith("(60.0 %) of T = 0.05, 0.2, 0.5: at an end of the "
                                                                  "swept range")
    below = keys_below("s", "n", "c", x="K", limit_name="training images")
    assert _detail(below, {"s": {"4": 1, "1024": 2}, "n": 5000}) == "largest K = 1024, below the 5,000 training images"
    assert _detail(below, {"s": {"4": 1, "8192": 2}, "n": 5000}).endswith("not below the 5,000 training images")


#: Plausible metrics for every notebook's effects (the keys its notebook writes).
PLAUSIBLE = {
    "01": {"infonce_knn_acc": 48.9, "margin_knn_acc": 28.9},
    "02": {"num_train": 5000, "init_loss": 6.67, "ln_k_plus_1": 6.93, "temperature_sweep": {"0.05": 22.1, "0.2": 54.5,
           "0.5": 41.8}, "negatives_sweep": {"4": 22.7, "64": 61.3, "1024": 54.5}},
    "03": {"softmax_knn_acc": 56.3, "random_init_knn_acc": 16.9, "moco_knn_acc": 65.3, "bank_bytes": 2_560_000,
           "queue_bytes": 524_288},
    "04": {"knn_acc_m099": 53.1, "knn_acc_m0": 15.2, "key_identification_m099": 100.0, "key_identification_m0": 51.2},
    "05": {"total_steps": 496, "momentum_sweep": {"0": {"knn_acc": 14.4}, "0.99": {"knn_acc": 48.6}}},
    "06": {"pretext_acc_no_shuffle": 11.2, "pretext_acc_shuffle": 4.5},
    "07": {"knn_acc": 33.6, "random_init_knn_acc": 24.3},
    "08": {"knn_acc": 49.0, "random_init_knn_acc": 22.8, "linear_acc": 64.6, "random_init_linear_acc": 48.9,
           "transfer_knn_acc": 24.5, "transfer_random_init_knn_acc": 12.4},
    "09": {"pos_sim_mean": 0.82, "neg_sim_mean": 0.3, "collapse_std_no_negatives": 0.006, "collapse_std": 0.069,
           "knn_acc": 49.8, "knn_acc_no_negatives": 30.0},
    "10": {"cmc_knn_acc": 37.2, "cmc_random_init_knn_acc": 15.1, "false_negative_rate_after": 0.06,
           "false_negative_rate_before": 0.1, "crd_student_knn_acc": 58.8, "student_random_init_knn_acc": 16.8,
           "debiased_knn_acc": 19.5, "debiased_knn_acc_at_debiased_t": 42.2, "moco_knn_acc_at_debiased_t": 47.9},
}


@pytest.mark.parametrize("number", sorted(PLAUSIBLE))
def test_every_verdict_is_a_sentence_with_units(number):
    verdicts = judge_effects(number, {"num_test": 1000, **PLAUSIBLE[number]})
    assert len(verdicts) == len(EFFECTS[number]) and all(v["holds"] for v in verdicts), verdicts
    for v in verdicts:
        # names, units and the margin in words; no bare formula such as "11.23 ≥ 9.492 (b = 4.492)"
        assert any(word in v["detail"] for word in ("noise band", "required", "allowed", "swept range", "below the"))
        assert not any(sym in v["detail"] for sym in ("≥", "≤", "(b =", " > ", " < ")), v["detail"]
        assert v["values"] and all(isinstance(x, float) for x in v["values"].values())


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
    assert saved["headline_effects"] == [{
        "claim": "MoCo beats its random init (kNN)", "holds": True,
        "detail": "MoCo kNN 60.0 % vs random init 20.0 %: +40.0 points, beyond the noise band of ±3.6 points",
        "values": {"MoCo kNN": 60.0, "random init": 20.0, "noise band": round(accuracy_noise(20.0, 1000), 4)}}]


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


def test_claims_that_need_more_scale_are_recorded_beside_the_headline_effects(tmp_path):
    """A claim the notebook says needs more scale is measured and recorded, but is not a headline effect."""
    metrics = {"cmc_knn_acc": 40.0, "cmc_random_init_knn_acc": 15.0, "crd_student_knn_acc": 60.0,
               "student_random_init_knn_acc": 18.0, "false_negative_rate_before": 0.1,
               "false_negative_rate_after": 0.09, "debiased_knn_acc": 19.5, "debiased_knn_acc_at_debiased_t": 42.2,
               "moco_knn_acc_at_debiased_t": 47.9, "num_train": 2048, "num_test": 1000}
    saved = Lesson("10_beyond_moco", tmp_path, device="cpu").finish(metrics, verbose=False)
    claims = {e["claim"] for e in saved["headline_effects"]}
    at_scale = saved["at_scale_effects"]
    assert [e["claim"] for e in at_scale] == [e.claim for e in AT_SCALE["10"]]
    assert not claims & {e["claim"] for e in at_scale}
    assert all(e["holds"] for e in saved["headline_effects"])
    assert not at_scale[0]["holds"] and "0.09" in at_scale[0]["detail"]
    assert "at_scale_effects" not in Lesson("07_moco_full", tmp_path / "07", device="cpu").finish(
        {"knn_acc": 60.0, "random_init_knn_acc": 20.0, "num_train": 500, "num_test": 1000}, verbose=False)

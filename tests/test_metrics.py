import math

import torch

from dogclf.metrics import (
    bootstrap_intervals,
    classification_metrics,
    confusion_matrix_figure,
    figure_to_array,
    shot_group_recall,
    wilson_interval,
)


def test_metrics_from_confusion_match_hand_computation():
    # true rows, predicted columns; class "c" has no true samples in this split
    cm = torch.tensor([[8, 2, 0], [1, 1, 0], [0, 1, 0]])
    m = classification_metrics(cm, ["a", "b", "c"])
    assert m["accuracy"] == 9 / 13
    assert m["per_class_recall"]["a"] == 0.8 and m["per_class_recall"]["b"] == 0.5
    assert m["per_class_recall"]["c"] == 0.0
    assert m["balanced_accuracy"] == (0.8 + 0.5 + 0.0) / 3
    assert m["per_class_precision"] == {"a": 8 / 9, "b": 1 / 4, "c": 0.0}
    f1_a, f1_b = 2 * 8 / (10 + 9), 2 * 1 / (2 + 4)
    assert math.isclose(m["macro_f1"], (f1_a + f1_b + 0) / 3)
    assert m["per_class_support"] == {"a": 10, "b": 2, "c": 1}


def test_absent_class_is_left_out_of_balanced_accuracy():
    cm = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    m = classification_metrics(cm, ["a", "b", "c"])
    assert math.isnan(m["per_class_recall"]["c"])
    assert m["balanced_accuracy"] == (0.75 + 1.0) / 2


def test_majority_predictor_gets_chance_balanced_accuracy():
    cm = torch.tensor([[100, 0, 0, 0], [10, 0, 0, 0], [2, 0, 0, 0], [1, 0, 0, 0]])
    m = classification_metrics(cm, list("abcd"))
    assert m["accuracy"] > 0.88 and m["balanced_accuracy"] == 0.25


def test_confusion_matrix_picture_renders():
    image = figure_to_array(confusion_matrix_figure(torch.tensor([[5, 1], [0, 2]]), ["samoyed", "maltese"], "t"))
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8"
    assert image.min() < 100 < image.max()  # not a blank canvas


def test_stratified_bootstrap_intervals_match_the_normal_approximation():
    confusion = torch.tensor([[80, 20], [3, 7]])  # class a: 80/100 right, class b: 7/10
    point = classification_metrics(confusion, ["a", "b"])
    ci = bootstrap_intervals(confusion, resamples=4000)
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        low, high = ci[key]
        assert low <= point[key] <= high, key
    # Resampling within each class: var(recall_c) = p_c (1 - p_c) / n_c.
    half = 1.96 * math.sqrt((100 / 110) ** 2 * 0.8 * 0.2 / 100 + (10 / 110) ** 2 * 0.7 * 0.3 / 10)
    assert math.isclose(ci["accuracy"][0], 87 / 110 - half, abs_tol=0.015)
    assert math.isclose(ci["accuracy"][1], 87 / 110 + half, abs_tol=0.015)
    half = 1.96 * math.sqrt(0.25 * (0.8 * 0.2 / 100 + 0.7 * 0.3 / 10))
    assert math.isclose(ci["balanced_accuracy"][0], 0.75 - half, abs_tol=0.03)
    assert math.isclose(ci["balanced_accuracy"][1], 0.75 + half, abs_tol=0.03)
    assert bootstrap_intervals(confusion, seed=3) == bootstrap_intervals(confusion, seed=3)


def test_every_class_stays_in_every_resample():
    # b has one test image, recalled: every resample keeps it, so balanced accuracy never drops below 0.5 + 0
    # (a plain bootstrap would drop b from some resamples and average a alone). Its own uncertainty is the
    # Wilson interval of 1/1.
    low, high = bootstrap_intervals(torch.tensor([[8, 2], [0, 1]]), resamples=4000)["balanced_accuracy"]
    assert 0.5 <= low < 0.9 <= high <= 1.0
    always_majority = bootstrap_intervals(torch.tensor([[150, 0, 0], [19, 0, 0], [1, 0, 0]]))["balanced_accuracy"]
    assert always_majority == (1 / 3, 1 / 3)


def test_wilson_interval_hand_values():
    # 1 hit of 1 at 95 %: centre (1 + z^2/2) / (1 + z^2), half z sqrt(z^2/4) / (1 + z^2), z = 1.95996
    z = 1.959964
    centre, half = (1 + z * z / 2) / (1 + z * z), z * (z / 2) / (1 + z * z)
    low, high = wilson_interval(1, 1)
    assert math.isclose(low, centre - half, rel_tol=1e-5) and high == 1.0
    assert math.isclose(low, 0.2065, abs_tol=1e-3)
    assert wilson_interval(0, 2)[0] == 0.0 and math.isclose(wilson_interval(0, 2)[1], 0.6576, abs_tol=1e-3)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_shot_group_recall():
    recall = {"samoyed": 0.9, "maltese": 0.5, "bichon": 0.0, "spitz": math.nan}
    counts = {"samoyed": 750, "maltese": 88, "bichon": 7, "spitz": 3}
    groups = shot_group_recall(recall, counts)
    assert groups["many"] == 0.9 and groups["medium"] == 0.5 and groups["few"] == 0.0  # NaN (no test image) left out
    assert math.isnan(shot_group_recall({"a": 0.5}, {"a": 50})["many"])

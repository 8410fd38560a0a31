import math

import torch

from dogclf.metrics import classification_metrics, confusion_matrix_figure, figure_to_array


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

import math

import pytest
import torch

from dogclf.module import class_weights, warmup_cosine


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [("none", [1.0, 1.0]), ("inverse", [2.5, 0.625]), ("inverse_sqrt", [1 / 0.6, 0.5 / 0.6])],
)
def test_class_weights_hand_computed(scheme, expected):
    # counts (1, 4): inverse raw (1, 1/4), sample-mean (1 + 1) / 5 = 0.4; inverse_sqrt raw (1, 1/2), mean 0.6
    weights = class_weights([1, 4], scheme)
    assert torch.allclose(weights, torch.tensor(expected))
    assert torch.isclose((weights * torch.tensor([1.0, 4.0])).sum() / 5, torch.tensor(1.0))


def test_warmup_then_cosine():
    factor = warmup_cosine(total_steps=110, warmup_steps=10, min_ratio=0.01)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(110) == pytest.approx(0.01) and factor(500) == pytest.approx(0.01)

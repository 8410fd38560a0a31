import math

import pytest
import torch

from dogclf.config import LOSSES, load_job
from dogclf.module import DogClassifier, warmup_cosine


def test_warmup_then_cosine():
    factor = warmup_cosine(total_steps=110, warmup_steps=10, min_ratio=0.01)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(110) == pytest.approx(0.01) and factor(500) == pytest.approx(0.01)


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains_the_module(loss):
    overrides = [("model.preset", "gmlp-pico"), ("optim.loss", loss), ("optim.drw_epoch", 1)]
    if loss == "focal":
        overrides.append(("optim.label_smoothing", 0.0))
    spec = load_job("gmlp", overrides).to_dict()
    module = DogClassifier(
        model_cfg=spec["model"],
        optim_cfg=spec["optim"],
        classes=["a", "b", "c"],
        class_counts=[50, 5, 1],
        image_size=32,
    )
    torch.nn.init.normal_(module.model.head.weight)  # the zero-initialised head would make every sample alike
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 0, 0, 1, 1, 2])
    losses = []
    for epoch in (0, 1):  # deferred re-weighting turns the class weights on at epoch 1
        module.criterion.set_epoch(epoch)
        loss_value = module.criterion(module.model(images), labels)
        loss_value.backward()
        losses.append(loss_value.item())
    assert all(math.isfinite(v) for v in losses) and losses[0] != losses[1]

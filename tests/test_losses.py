"""Long-tail losses against values worked out by hand on 2-3 class examples."""

import math

import pytest
import torch
import torch.nn.functional as F

from dogclf.losses import LOSSES, adjust_logits, build_loss, class_weights, ldam_margins, tune_tau


def close(value: torch.Tensor, expected: float, rel: float = 1e-5) -> bool:
    return math.isclose(value.item(), expected, rel_tol=rel)


def ce_by_hand(logits: list[float], target: int) -> float:
    """-log softmax(logits)[target], written out."""
    return -math.log(math.exp(logits[target]) / sum(math.exp(z) for z in logits))


# --- class weights -------------------------------------------------------------------------------------------


def test_class_weights_hand_computed():
    counts = [100, 10, 1]
    assert class_weights(counts, "none").tolist() == [1, 1, 1]
    raw = {
        "inverse": [1 / 100, 1 / 10, 1 / 1],
        "inverse_sqrt": [1 / 10, 1 / math.sqrt(10), 1 / 1],
        "effective_number": [(1 - 0.9) / (1 - 0.9**100), (1 - 0.9) / (1 - 0.9**10), (1 - 0.9) / (1 - 0.9**1)],
    }
    for scheme, r in raw.items():
        expected = [3 * x / sum(r) for x in r]  # scaled to sum to C = 3
        assert class_weights(counts, scheme, beta=0.9).tolist() == pytest.approx(expected, rel=1e-6), scheme


def test_zero_count_class_gets_weight_zero():
    # inverse: raw [1/4, -, 1] -> the two seen classes share the sum 3: [0.25, 1] * 3 / 1.25
    assert class_weights([4, 0, 1], "inverse").tolist() == pytest.approx([0.6, 0.0, 2.4])
    for scheme in ("inverse_sqrt", "effective_number"):
        w = class_weights([4, 0, 1], scheme)
        assert torch.isfinite(w).all() and w[1] == 0 and math.isclose(w.sum().item(), 3, rel_tol=1e-6)


def test_class_weights_reject_bad_input():
    with pytest.raises(ValueError, match="unknown class weighting 'sqrt'"):
        class_weights([3, 1], "sqrt")
    with pytest.raises(ValueError, match="beta"):
        class_weights([3, 1], "effective_number", beta=1.0)
    with pytest.raises(ValueError, match="class_counts"):
        class_weights([0, 0], "inverse")


# --- ce and focal -------------------------------------------------------------------------------------------

LOGITS = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # two samples, classes 0 and 1
TARGETS = torch.tensor([0, 1])
L0, L1 = math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1))  # their plain CE terms


def test_weighted_ce_by_hand_and_like_torch():
    # inverse weights for counts [3, 1]: [1/3, 1] * 2 / (4/3) = [0.5, 1.5]
    loss = build_loss("ce", class_counts=[3, 1], weighting="inverse")
    assert close(loss(LOGITS, TARGETS), (0.5 * L0 + 1.5 * L1) / (0.5 + 1.5))
    smooth = build_loss("ce", class_counts=[3, 1], weighting="inverse", label_smoothing=0.1)
    expected = F.cross_entropy(LOGITS, TARGETS, weight=torch.tensor([0.5, 1.5]), label_smoothing=0.1)
    torch.testing.assert_close(smooth(LOGITS, TARGETS), expected)


def test_focal_gamma_2_by_hand():
    p = math.exp(1) / (math.exp(1) + math.exp(0) + math.exp(-1))  # p_t of target 0
    loss = build_loss("focal", class_counts=[1, 1, 1], focal_gamma=2.0)
    assert close(loss(torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([0])), -((1 - p) ** 2) * math.log(p))


def test_weighted_focal_by_hand():
    p0, p1 = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1))  # p_t of the two samples
    f0, f1 = -((1 - p0) ** 2) * math.log(p0), -((1 - p1) ** 2) * math.log(p1)
    loss = build_loss("focal", class_counts=[3, 1], weighting="inverse")  # weights [0.5, 1.5] as above
    logits, targets = torch.cat([LOGITS, LOGITS[1:]]), torch.tensor([0, 1, 1])  # the minority sample twice
    assert close(loss(logits, targets), (0.5 * f0 + 1.5 * f1 + 1.5 * f1) / (0.5 + 1.5 + 1.5))


def test_focal_gamma_0_is_cross_entropy():
    logits, targets = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 4
    loss = build_loss("focal", class_counts=[5, 3, 2, 1], focal_gamma=0.0)
    torch.testing.assert_close(loss(logits, targets), F.cross_entropy(logits, targets))
    assert close(build_loss("focal", class_counts=[3, 1], focal_gamma=0.0)(LOGITS, TARGETS), (L0 + L1) / 2)


def test_focal_refuses_label_smoothing():
    with pytest.raises(ValueError, match="focal loss does not combine with label smoothing"):
        build_loss("focal", class_counts=[3, 1], label_smoothing=0.1)


# --- logit adjustment and balanced softmax ----------------------------------------------------------------


def test_logit_adjusted_by_hand():
    # counts [3, 1]: prior [0.75, 0.25]; zero logits + tau * log prior, target the minority class
    zeros, minority = torch.zeros(1, 2), torch.tensor([1])
    tau1 = build_loss("logit_adjusted", class_counts=[3, 1], tau=1.0)
    assert close(tau1(zeros, minority), -math.log(0.25 / (0.75 + 0.25)))  # log 4
    tau2 = build_loss("logit_adjusted", class_counts=[3, 1], tau=2.0)
    assert close(tau2(zeros, minority), -math.log(0.25**2 / (0.75**2 + 0.25**2)))  # log 10


def test_balanced_softmax_by_hand_and_equal_to_logit_adjusted_tau_1():
    loss = build_loss("balanced_softmax", class_counts=[3, 1])
    assert close(loss(torch.zeros(1, 2), torch.tensor([1])), ce_by_hand([math.log(3), math.log(1)], 1))
    logits, targets = torch.randn(6, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 2, 1, 0])
    adjusted = build_loss("logit_adjusted", class_counts=[50, 7, 1], tau=1.0)
    balanced = build_loss("balanced_softmax", class_counts=[50, 7, 1])
    # log n_c = log prior_c + log N: the shift by log N cancels in the softmax
    torch.testing.assert_close(balanced(logits, targets), adjusted(logits, targets))


def test_logit_adjusted_tau_0_is_cross_entropy():
    logits, targets = torch.randn(6, 3, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 2, 1, 0])
    loss = build_loss("logit_adjusted", class_counts=[50, 7, 1], tau=0.0, label_smoothing=0.1)
    torch.testing.assert_close(loss(logits, targets), F.cross_entropy(logits, targets, label_smoothing=0.1))


def test_zero_count_class_is_finite_everywhere():
    for name in LOSSES:
        loss = build_loss(name, class_counts=[5, 0, 2], weighting="inverse")
        assert torch.isfinite(loss(LOGITS[:, :1].repeat(1, 3), torch.tensor([0, 2]))), name


# --- LDAM and DRW ---------------------------------------------------------------------------------------------


def test_ldam_margins_and_loss_by_hand():
    # m_c ~ n_c**-1/4 = [1/100**0.25, 1/1], scaled so the largest is 0.5
    assert ldam_margins([100, 1], 0.5).tolist() == pytest.approx([0.5 / 100**0.25, 0.5])
    loss = build_loss("ldam", class_counts=[100, 1], ldam_max_margin=0.5, ldam_scale=2.0)
    # target 1: its logit loses 0.5, then all are scaled by 2: [0.2, 0.1 - 0.5] * 2 = [0.4, -0.8]
    assert close(loss(torch.tensor([[0.2, 0.1]]), torch.tensor([1])), ce_by_hand([0.4, -0.8], 1))
    # target 0: margin 0.5 / sqrt(10) on logit 0
    assert close(loss(torch.tensor([[0.2, 0.1]]), torch.tensor([0])), ce_by_hand([2 * (0.2 - 0.5 / 10**0.5), 0.2], 0))


def test_drw_switches_to_effective_number_weights_at_drw_epoch():
    # beta 0.5, counts [3, 1]: raw [0.5 / (1 - 0.125), 0.5 / 0.5] = [4/7, 1], scaled to sum 2: [8/11, 14/11]
    loss = build_loss("ce", class_counts=[3, 1], weighting="inverse", beta=0.5, drw_epoch=2)  # weighting ignored
    for epoch in (0, 1):
        loss.set_epoch(epoch)
        assert close(loss(LOGITS, TARGETS), (L0 + L1) / 2)
    for epoch in (2, 5):
        loss.set_epoch(epoch)
        assert close(loss(LOGITS, TARGETS), (8 * L0 + 14 * L1) / (8 + 14))


def test_set_epoch_is_a_no_op_without_drw():
    loss = build_loss("ce", class_counts=[3, 1], weighting="inverse")
    before = loss(LOGITS, TARGETS)
    loss.set_epoch(10)
    torch.testing.assert_close(loss(LOGITS, TARGETS), before)


# --- post-hoc logit adjustment ------------------------------------------------------------------------------


def test_adjust_logits_by_hand():
    adjusted = adjust_logits(torch.tensor([[1.0, 0.0]]), [9, 1], tau=1.0)
    assert adjusted[0].tolist() == pytest.approx([1 - math.log(0.9), 0 - math.log(0.1)])


def test_tune_tau_flips_the_minority_and_ties_pick_the_smaller_tau():
    # counts [9, 1]: tau shifts (z1 - z0) up by tau * log 9 = 2.197 tau. Class-1 samples (margin 1 for class 0)
    # flip from tau > 0.455, class-0 samples (margin 2) from tau > 0.910: balanced accuracy
    # 0.5 at tau 0 and 0.25, 1.0 at 0.5 and 0.75, 0.5 again from 1.0 on -> the smaller of the tie, 0.5.
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    targets = torch.tensor([0, 0, 1, 1])
    assert tune_tau(logits, targets, [9, 1]) == (0.5, 1.0)
    assert tune_tau(logits, targets, [9, 1], taus=(0.75, 0.5, 0.0)) == (0.5, 1.0)  # grid order does not matter
    assert tune_tau(logits, targets, [9, 1], taus=(0.25, 0.0)) == (0.0, 0.5)


def test_tune_tau_averages_recall_over_present_classes_only():
    # class 2 is absent from the targets: balanced accuracy is (1 + 0) / 2, not over 3 classes
    logits, targets = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([0, 1])
    assert tune_tau(logits, targets, [1, 1, 1], taus=(0.0,)) == (0.0, 0.5)


# --- plumbing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSSES)
def test_gradients_flow_from_bf16_logits(name):
    loss = build_loss(name, class_counts=[20, 5, 1], drw_epoch=0 if name == "ldam" else None)
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(3)).bfloat16().requires_grad_()
    value = loss(logits, torch.tensor([0, 1, 2, 0]))
    value.backward()
    assert value.dtype == torch.float32 and value.ndim == 0
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad).all()


def test_buffers_follow_the_module_and_stay_out_of_checkpoints():
    loss = build_loss("ldam", class_counts=[20, 5, 1], drw_epoch=1)
    assert {name for name, _ in loss.named_buffers()} == {"weight", "offset", "margin"}
    assert loss.state_dict() == {}
    loss.double().set_epoch(1)  # a dtype cast (as bf16-true / 64-true precision do) keeps the maths in float32
    assert loss(LOGITS[:, :1].repeat(1, 3), TARGETS).dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "dice"}, "unknown loss 'dice': expected one of ce, focal"),
        ({"weighting": "sqrt"}, "unknown class weighting"),
        ({"focal_gamma": -1.0}, "focal_gamma must be >= 0"),
        ({"tau": -0.5}, "tau must be >= 0"),
        ({"ldam_max_margin": -0.1}, "ldam_max_margin must be >= 0"),
        ({"beta": 1.0}, "beta must be in"),
        ({"beta": -0.1}, "beta must be in"),
        ({"ldam_scale": 0.0}, "ldam_scale must be > 0"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"drw_epoch": -1}, "drw_epoch"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    kwargs = {"name": "ce", "class_counts": [3, 1], **kwargs}
    with pytest.raises(ValueError, match=match):
        build_loss(kwargs.pop("name"), **kwargs)

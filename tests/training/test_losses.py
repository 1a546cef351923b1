"""Losses and the output-to-label rules, on hand-made tensors with hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from liverseg.constants import BACKGROUND, LIVER, LOSSES, TUMOR
from liverseg.labels import head_for_loss, out_channels, to_labels, to_probabilities
from liverseg.training.losses import compute_loss, regions_from_labels, soft_dice_loss

# Four voxels along W: background, liver, tumor, tumor. Shape (B=1, 1, 4, 1, 1).
LABEL = torch.tensor([BACKGROUND, LIVER, TUMOR, TUMOR], dtype=torch.uint8).reshape(1, 1, 4, 1, 1)


def perfect_logits(label: torch.Tensor, head: str, magnitude: float = 30.0) -> torch.Tensor:
    """Logits that are +magnitude on the right channel(s) and -magnitude elsewhere."""
    if head == "regions":
        return (2 * regions_from_labels(label) - 1) * magnitude
    one_hot = torch.nn.functional.one_hot(label[:, 0].long(), 3).movedim(-1, 1).float()
    return (2 * one_hot - 1) * magnitude


def test_regions_from_labels():
    regions = regions_from_labels(LABEL)
    assert regions.shape == (1, 2, 4, 1, 1) and regions.dtype == torch.float32
    assert regions[0, 0].flatten().tolist() == [0, 1, 1, 1]
    assert regions[0, 1].flatten().tolist() == [0, 0, 1, 1]
    # Float labels (as after a resampling) with float noise give the same regions.
    assert torch.equal(regions_from_labels(LABEL.float() + 0.01), regions)


def test_label_values_outside_the_label_set_are_rejected():
    with pytest.raises(ValueError, match=r"found \[0, 1, 3\]"):
        regions_from_labels(torch.tensor([0, 1, 3]).reshape(1, 1, 3, 1, 1))


def test_bce_of_zero_logits_is_ln2():
    loss = compute_loss(torch.zeros(1, 2, 4, 1, 1), LABEL, "bce")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_ce_of_zero_logits_is_ln3():
    loss = compute_loss(torch.zeros(1, 3, 4, 1, 1), LABEL, "ce")
    assert loss.item() == pytest.approx(math.log(3), abs=1e-7)


def test_bce_dice_of_zero_logits():
    # p = 0.5 everywhere. Liver region t = [0,1,1,1]: dice = 2*1.5 / (2 + 3) = 0.6.
    # Tumor region t = [0,0,1,1]: dice = 2*1 / (2 + 2) = 0.5. Dice loss = 1 - 0.55.
    loss = compute_loss(torch.zeros(1, 2, 4, 1, 1), LABEL, "bce_dice")
    assert loss.item() == pytest.approx(math.log(2) + 0.45, abs=1e-5)


def test_ce_dice_of_zero_logits():
    # p = 1/3 everywhere. Liver t = [0,1,0,0]: dice = (2/3) / (4/3 + 1) = 2/7.
    # Tumor t = [0,0,1,1]: dice = (4/3) / (4/3 + 2) = 0.4. Background is not in the Dice.
    loss = compute_loss(torch.zeros(1, 3, 4, 1, 1), LABEL, "ce_dice")
    assert loss.item() == pytest.approx(math.log(3) + 1 - (2 / 7 + 0.4) / 2, abs=1e-5)


def test_ce_uses_the_right_class():
    # One voxel of TUMOR with logits (0, 0, ln 2): p(tumor) = 2 / 4, so CE = ln 2.
    logits = torch.tensor([0.0, 0.0, math.log(2)]).reshape(1, 3, 1, 1, 1)
    label = torch.full((1, 1, 1, 1, 1), TUMOR)
    assert compute_loss(logits, label, "ce").item() == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_perfect_logits_give_near_zero_loss(name):
    logits = perfect_logits(LABEL, head_for_loss(name))
    assert compute_loss(logits, LABEL, name).item() < 1e-4


@pytest.mark.parametrize("name", LOSSES)
def test_wrong_logits_give_a_large_loss(name):
    logits = -perfect_logits(LABEL, head_for_loss(name))
    assert compute_loss(logits, LABEL, name).item() > 1.0


@pytest.mark.parametrize("name", ["bce_dice", "ce_dice"])
def test_patch_without_tumor_is_finite(name):
    label = torch.tensor([BACKGROUND, LIVER, LIVER, BACKGROUND]).reshape(1, 1, 4, 1, 1)
    head = head_for_loss(name)
    assert compute_loss(perfect_logits(label, head), label, name).item() < 1e-4
    zero = torch.zeros(1, out_channels(head), 4, 1, 1)
    assert torch.isfinite(compute_loss(zero, label, name))
    background = torch.zeros(1, 1, 4, 1, 1, dtype=torch.long)
    assert torch.isfinite(compute_loss(zero, background, name))


def test_soft_dice_by_hand():
    # Channel 0: p = [.5, .5, 1, 0], t = [1, 0, 1, 0]: dice = 2*1.5 / (2 + 2) = 0.75.
    # Channel 1: empty in both: dice = eps / eps = 1, not NaN. Loss = 1 - (0.75 + 1) / 2.
    p = torch.tensor([[0.5, 0.5, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).reshape(1, 2, 4, 1, 1)
    t = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).reshape(1, 2, 4, 1, 1)
    assert soft_dice_loss(p, t).item() == pytest.approx(0.125, abs=1e-5)
    # An empty target with a false positive is penalised: dice ~ 0 on that channel.
    p[0, 1, 0] = 1.0
    assert soft_dice_loss(p, t).item() == pytest.approx(1 - 0.75 / 2, abs=1e-4)


def test_soft_dice_sums_over_the_batch():
    # Batch Dice: sample 0 has the only foreground; sample 1's empty channel is not a separate
    # 1.0 term. p = t on sample 0, p = 0.5 on one voxel of sample 1: dice = 2 / (1.5 + 1) = 0.8.
    p = torch.tensor([[1.0, 0.0], [0.5, 0.0]]).reshape(2, 1, 2, 1, 1)
    t = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).reshape(2, 1, 2, 1, 1)
    assert soft_dice_loss(p, t).item() == pytest.approx(0.2, abs=1e-5)


@pytest.mark.parametrize("head", ["regions", "softmax"])
def test_decoding_perfect_logits_gives_the_label_back(head):
    probabilities = to_probabilities(perfect_logits(LABEL, head), head)
    assert torch.equal(to_labels(probabilities, head), LABEL[:, 0])


@pytest.mark.parametrize("name", LOSSES)
def test_gradient_flows(name):
    torch.manual_seed(0)
    logits = torch.randn(2, out_channels(head_for_loss(name)), 4, 3, 2, requires_grad=True)
    label = torch.randint(0, 3, (2, 1, 4, 3, 2))
    compute_loss(logits, label, name).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES)
def test_loss_is_float32_under_bf16_autocast(name):
    torch.manual_seed(0)
    logits = torch.randn(1, out_channels(head_for_loss(name)), 4, 4, 4)
    label = torch.randint(0, 3, (1, 1, 4, 4, 4))
    low = logits.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compute_loss(low, label, name)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(compute_loss(low.float(), label, name).item(), rel=1e-6)


def test_shape_mismatches_are_rejected():
    with pytest.raises(ValueError, match="another loss"):
        compute_loss(torch.zeros(1, 3, 4, 1, 1), LABEL, "bce")
    with pytest.raises(ValueError, match="spatial"):
        compute_loss(torch.zeros(1, 2, 5, 1, 1), LABEL, "bce")
    with pytest.raises(ValueError, match=r"\(B, 1, W, H, D\)"):
        compute_loss(torch.zeros(1, 2, 4, 1, 1), LABEL[0], "bce")


def test_deep_supervision_loss_weighs_outputs_against_the_reduced_label():
    # Label 4 x 2 x 2; its nearest-neighbour half is the voxels at even indices: (B, L) on W.
    label = torch.tensor([BACKGROUND, BACKGROUND, LIVER, TUMOR], dtype=torch.uint8)
    label = label.reshape(1, 1, 4, 1, 1).expand(1, 1, 4, 2, 2).contiguous()
    half = torch.tensor([BACKGROUND, LIVER], dtype=torch.uint8).reshape(1, 1, 2, 1, 1)
    full_logits = torch.randn(1, 2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    half_logits = torch.randn(1, 2, 2, 1, 1, generator=torch.Generator().manual_seed(1))
    loss = compute_loss((full_logits, half_logits), label, "bce")
    expected = 2 / 3 * compute_loss(full_logits, label, "bce") + 1 / 3 * compute_loss(
        half_logits, half, "bce"
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # One output is the plain loss.
    assert compute_loss((full_logits,), label, "bce").item() == pytest.approx(
        compute_loss(full_logits, label, "bce").item()
    )


def test_deep_supervision_needs_an_output():
    with pytest.raises(ValueError, match="at least one output"):
        compute_loss((), LABEL, "bce")


def test_unknown_loss_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="bce, bce_dice, ce, ce_dice"):
        compute_loss(torch.zeros(1, 2, 4, 1, 1), LABEL, "focal")

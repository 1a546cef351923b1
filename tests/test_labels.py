"""Output heads, decoding probabilities to labels, and label-value checks (liverseg.labels)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from liverseg.constants import BACKGROUND, LIVER, LOSSES, TUMOR
from liverseg.labels import (
    background_probabilities,
    head_for_loss,
    invalid_label_values,
    out_channels,
    to_labels,
    to_probabilities,
)


def test_head_and_channels_of_each_loss():
    assert [head_for_loss(name) for name in LOSSES] == ["regions", "regions", "softmax", "softmax"]
    assert out_channels("regions") == 2
    assert out_channels("softmax") == 3


@pytest.mark.parametrize("head", ["regions", "softmax"])
def test_background_probabilities_decode_to_background(head):
    values = background_probabilities(head)
    assert len(values) == out_channels(head)
    probabilities = torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 2, 2, 2)
    assert (to_labels(probabilities, head) == BACKGROUND).all()


def test_unknown_loss_lists_the_choices():
    with pytest.raises(ValueError, match="bce, bce_dice, ce, ce_dice") as info:
        head_for_loss("dice")
    assert "'dice'" in str(info.value)
    with pytest.raises(ValueError, match="regions, softmax"):
        out_channels("sigmoid")


def test_to_probabilities():
    logits = torch.tensor([0.0, math.log(3)]).reshape(2, 1, 1, 1)
    regions = to_probabilities(logits, "regions").flatten().tolist()
    assert regions == pytest.approx([0.5, 0.75])
    softmax = to_probabilities(logits.unsqueeze(0), "softmax").flatten().tolist()
    assert softmax == pytest.approx([0.25, 0.75])


def test_to_labels_regions_keeps_tumor_inside_liver():
    # Voxels: liver only, liver + tumor, tumor without liver region, nothing.
    p = torch.tensor([[0.9, 0.9, 0.2, 0.1], [0.1, 0.8, 0.95, 0.2]]).reshape(2, 4, 1, 1)
    labels = to_labels(p, "regions")
    assert labels.dtype == torch.uint8 and labels.shape == (4, 1, 1)
    assert labels.flatten().tolist() == [LIVER, TUMOR, BACKGROUND, BACKGROUND]
    assert to_labels(p, "regions", threshold=0.85).flatten().tolist() == [
        LIVER,
        LIVER,
        BACKGROUND,
        BACKGROUND,
    ]
    batch = to_labels(torch.stack([p, p.flip(1)]), "regions")
    assert batch.shape == (2, 4, 1, 1)
    assert batch[1].flatten().tolist() == [BACKGROUND, BACKGROUND, TUMOR, LIVER]


def test_to_labels_softmax_is_argmax():
    p = torch.tensor([[0.7, 0.1, 0.2], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6]]).T.reshape(1, 3, 3, 1, 1)
    labels = to_labels(p, "softmax")
    assert labels.dtype == torch.uint8 and labels.shape == (1, 3, 1, 1)
    assert labels.flatten().tolist() == [BACKGROUND, LIVER, TUMOR]


def test_to_labels_rejects_a_head_channel_mismatch():
    with pytest.raises(ValueError, match="another loss"):
        to_labels(torch.zeros(3, 2, 2, 2), "regions")


def test_invalid_label_values_of_each_kind():
    assert invalid_label_values(np.array([BACKGROUND, LIVER, TUMOR], np.uint8)) == []
    assert invalid_label_values(np.array([0, 1, 2, 3, 255, 3], np.uint8)) == [3, 255]
    found = invalid_label_values(np.array([0.0, 1.0, 0.5, 2.0000001, np.nan]))
    assert found[:2] == [0.5, 2.0000001] and np.isnan(found[2])  # float maps must be exact
    assert invalid_label_values(np.array([-1, 0, 2], np.int16)) == [-1]
    assert invalid_label_values(np.arange(100), limit=3) == [3, 4, 5]


def test_labels_needs_no_torch_to_import():
    import subprocess
    import sys

    code = "import sys, liverseg.labels; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

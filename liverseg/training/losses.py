"""Training losses of the two output heads (:mod:`liverseg.labels` defines the heads).

- ``bce`` / ``bce_dice``: the ``"regions"`` head, binary cross entropy on the two nested regions
  (liver including tumor, tumor), plus a soft Dice term for ``bce_dice``;
- ``ce`` / ``ce_dice``: the ``"softmax"`` head, cross entropy over background, liver and tumor,
  plus a soft Dice term on liver and tumor for ``ce_dice``.

Losses are computed in float32 even when the logits come from autocast (bf16/fp16). The Dice
terms are "batch Dice" (nnU-Net): sums run over the batch and all voxels before the ratio, with a
small smoothing term, so a patch without tumor gives a finite value, never NaN. Under torchrun the
batch is the global one: the sums are added over the ranks (with their gradients, as nnU-Net
does), so N ranks of batch B train as one process of batch N x B.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from liverseg.constants import LABEL_VALUES, LIVER, TUMOR
from liverseg.labels import REGIONS, SOFTMAX_CLASSES, check_channels, head_for_loss
from liverseg.training import distributed


def regions_from_labels(label: torch.Tensor) -> torch.Tensor:
    """Binary region targets of the ``"regions"`` head.

    Args:
        label: Label map ``(B, 1, W, H, D)`` with values in {BACKGROUND, LIVER, TUMOR}; any integer
            or float dtype (floats are rounded).

    Returns:
        Float32 targets ``(B, 2, W, H, D)``: channel 0 the liver region (LIVER or TUMOR),
        channel 1 the tumor region (TUMOR).
    """
    values = _label_values(label)
    return torch.cat([_isin(values, region) for region in REGIONS], dim=1).float()


def soft_dice_loss(
    probabilities: torch.Tensor, targets: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Batch soft Dice loss, averaged over channels.

    Per channel c: ``dice_c = (2 * sum(p * t) + eps) / (sum(p) + sum(t) + eps)``, the sums over
    the batch and all voxels (under torchrun: every rank's batch); the loss is
    ``1 - mean_c(dice_c)``. A channel absent from both prediction and target gives ``dice_c`` = 1,
    never NaN.

    Args:
        probabilities: ``(B, C, W, H, D)`` values in [0, 1].
        targets: ``(B, C, W, H, D)`` in {0, 1} (or soft targets), same shape.
        eps: Smoothing added to numerator and denominator.

    Returns:
        Scalar loss in [0, 1], float32.
    """
    if probabilities.shape != targets.shape:
        raise ValueError(
            f"probabilities {tuple(probabilities.shape)} and targets {tuple(targets.shape)} "
            "must have the same shape"
        )
    p = probabilities.float()
    t = targets.float()
    dims = [0, *range(2, p.ndim)]
    sums = torch.stack([(p * t).sum(dims), p.sum(dims) + t.sum(dims)])
    intersection, denominator = distributed.sum_with_grad(sums).unbind(0)
    dice = (2 * intersection + eps) / (denominator + eps)
    return 1 - dice.mean()


def compute_loss(
    logits: torch.Tensor | Sequence[torch.Tensor], label: torch.Tensor, name: str
) -> torch.Tensor:
    """Training loss of a batch.

    With deep supervision (``logits`` a sequence, full resolution first, each next one half the
    size: :class:`liverseg.model.UNet3D` in training mode), the loss is nnU-Net's weighted sum:
    output ``i`` weighs ``2 ** -i`` (weights normalised to sum to 1) against the label reduced to
    its size by nearest-neighbour sampling.

    - ``bce``: binary cross entropy with logits on the two regions, mean over all elements.
    - ``bce_dice``: ``bce`` + :func:`soft_dice_loss` on the sigmoid regions.
    - ``ce``: cross entropy over the three softmax classes, mean over voxels.
    - ``ce_dice``: ``ce`` + :func:`soft_dice_loss` on the liver and tumor softmax channels.

    Args:
        logits: Network output ``(B, C, W, H, D)``, C = ``out_channels(head_for_loss(name))``;
            any float dtype (computed in float32); or a sequence of them (deep supervision).
        label: Label map ``(B, 1, W, H, D)`` with values in {BACKGROUND, LIVER, TUMOR}; integer or
            float dtype.
        name: One of :data:`LOSSES`.

    Returns:
        Scalar float32 loss.

    Raises:
        ValueError: For an unknown loss, mismatched shapes or label values outside the label set.
    """
    if not isinstance(logits, torch.Tensor):
        if not logits:
            raise ValueError("deep supervision needs at least one output, got none")
        weights = [0.5**i for i in range(len(logits))]
        total = 0.0
        for weight, output in zip(weights, logits):
            target = label
            if output.shape[2:] != label.shape[2:]:
                target = F.interpolate(label.float(), size=output.shape[2:], mode="nearest")
            total = total + weight * compute_loss(output, target, name)
        return total / sum(weights)
    head = head_for_loss(name)
    if logits.ndim != 5 or label.ndim != 5 or label.shape[1] != 1:
        raise ValueError(
            f"expected logits (B, C, W, H, D) and label (B, 1, W, H, D), got "
            f"{tuple(logits.shape)} and {tuple(label.shape)}"
        )
    check_channels(logits.shape[1], head, "logits")
    if logits.shape[0] != label.shape[0] or logits.shape[2:] != label.shape[2:]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and label {tuple(label.shape)} differ in batch or "
            "spatial size"
        )
    logits = logits.float()
    if head == "regions":
        targets = regions_from_labels(label)
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        if name == "bce_dice":
            loss = loss + soft_dice_loss(torch.sigmoid(logits), targets)
        return loss
    values = _label_values(label)[:, 0]
    classes = torch.zeros_like(values)
    for index, value in enumerate(SOFTMAX_CLASSES):
        classes[values == value] = index
    loss = F.cross_entropy(logits, classes)
    if name == "ce_dice":
        one_hot = F.one_hot(classes, len(SOFTMAX_CLASSES)).movedim(-1, 1)
        foreground = [SOFTMAX_CLASSES.index(LIVER), SOFTMAX_CLASSES.index(TUMOR)]
        probabilities = torch.softmax(logits, dim=1)
        loss = loss + soft_dice_loss(probabilities[:, foreground], one_hot[:, foreground])
    return loss


def _label_values(label: torch.Tensor) -> torch.Tensor:
    """Integer label values (int64), rounding floats; raise on values outside the label set."""
    values = label.round().long() if label.is_floating_point() else label.long()
    valid = torch.tensor(LABEL_VALUES, device=values.device)
    if not bool(torch.isin(values, valid).all()):
        found = sorted(torch.unique(values).tolist())
        raise ValueError(f"label values must be in {LABEL_VALUES}, found {found}")
    return values


def _isin(values: torch.Tensor, members: tuple[int, ...]) -> torch.Tensor:
    return torch.isin(values, torch.tensor(members, device=values.device))

"""Training losses, and THE one place where network outputs become label maps.

The labels are nested: every TUMOR voxel lies inside the liver, so "liver including tumor"
(label in {LIVER, TUMOR}) contains "tumor" (label == TUMOR). The network has one of two output
heads, chosen by the loss (:func:`head_for_loss`):

``"regions"`` (losses ``bce``, ``bce_dice``; the default)
    Two sigmoid channels, one per nested region, as in nnU-Net's region-based training:
    channel 0 = liver region (label in {LIVER, TUMOR}), channel 1 = tumor region
    (label == TUMOR). Each channel is an independent binary problem, which is what binary cross
    entropy fits; the overlap of the two regions is intended, not a conflict.

``"softmax"`` (losses ``ce``, ``ce_dice``)
    Three mutually exclusive softmax channels in :data:`SOFTMAX_CLASSES` order: background,
    liver (excluding tumor), tumor.

Decoding (:func:`to_labels`):

- regions: a voxel is LIVER where ``p_liver_region > threshold`` and TUMOR where in addition
  ``p_tumor > threshold``. A high tumor probability outside the liver region is background:
  tumor is only ever predicted inside the liver.
- softmax: the class of the largest probability.

Every other module (training, validation, inference, notebooks) goes through
:func:`to_probabilities` and :func:`to_labels` rather than thresholding or taking an argmax itself.

Losses are computed in float32 even when the logits come from autocast (bf16/fp16). The Dice
terms are "batch Dice" (nnU-Net): sums run over the batch and all voxels before the ratio, with a
small smoothing term, so a patch without tumor gives a finite value, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from liverseg.constants import BACKGROUND, LABEL_VALUES, LIVER, TUMOR

LOSSES = ("bce", "bce_dice", "ce", "ce_dice")
HEADS = ("regions", "softmax")
# Region channels of the "regions" head: each is the set of label values it contains.
REGIONS = ((LIVER, TUMOR), (TUMOR,))
# Class of each channel of the "softmax" head.
SOFTMAX_CLASSES = (BACKGROUND, LIVER, TUMOR)

_HEAD_OF_LOSS = {"bce": "regions", "bce_dice": "regions", "ce": "softmax", "ce_dice": "softmax"}


def head_for_loss(name: str) -> str:
    """The output head a loss trains.

    Args:
        name: One of :data:`LOSSES`.

    Returns:
        ``"regions"`` for ``bce``/``bce_dice``, ``"softmax"`` for ``ce``/``ce_dice``.

    Raises:
        ValueError: For an unknown loss name; the message lists the choices.
    """
    if name not in _HEAD_OF_LOSS:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return _HEAD_OF_LOSS[name]


def out_channels(head: str) -> int:
    """Number of network output channels of a head: 2 for ``"regions"``, 3 for ``"softmax"``.

    Raises:
        ValueError: For an unknown head; the message lists the choices.
    """
    _check_head(head)
    return len(REGIONS) if head == "regions" else len(SOFTMAX_CLASSES)


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


def to_probabilities(logits: torch.Tensor, head: str) -> torch.Tensor:
    """Per-channel probabilities from logits: sigmoid (``"regions"``) or softmax (``"softmax"``).

    Args:
        logits: ``(B, C, W, H, D)`` or a single volume ``(C, W, H, D)``.
        head: ``"regions"`` or ``"softmax"``.

    Returns:
        Probabilities of the same shape and dtype.
    """
    _check_head(head)
    if head == "regions":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=_channel_dim(logits))


def to_labels(probabilities: torch.Tensor, head: str, threshold: float = 0.5) -> torch.Tensor:
    """Decode probabilities into a label map (the rule in this module's docstring).

    Args:
        probabilities: ``(B, C, W, H, D)`` or a single volume ``(C, W, H, D)``, from
            :func:`to_probabilities`.
        head: ``"regions"`` (C = 2) or ``"softmax"`` (C = 3).
        threshold: Region probability above which a voxel belongs to a region (``"regions"``
            only).

    Returns:
        uint8 labels in {BACKGROUND, LIVER, TUMOR}, shape ``(B, W, H, D)`` or ``(W, H, D)``.

    Raises:
        ValueError: For an unknown head or a channel count that does not match it.
    """
    dim = _channel_dim(probabilities)
    _check_channels(probabilities.shape[dim], head, "probabilities")
    if head == "softmax":
        classes = torch.tensor(SOFTMAX_CLASSES, dtype=torch.uint8, device=probabilities.device)
        return classes[probabilities.argmax(dim=dim)]
    p_liver, p_tumor = probabilities.unbind(dim=dim)
    liver = p_liver > threshold
    tumor = liver & (p_tumor > threshold)
    labels = torch.full(liver.shape, BACKGROUND, dtype=torch.uint8, device=probabilities.device)
    labels[liver] = LIVER
    labels[tumor] = TUMOR
    return labels


def soft_dice_loss(
    probabilities: torch.Tensor, targets: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Batch soft Dice loss, averaged over channels.

    Per channel c: ``dice_c = (2 * sum(p * t) + eps) / (sum(p) + sum(t) + eps)``, the sums over
    the batch and all voxels; the loss is ``1 - mean_c(dice_c)``. A channel absent from both
    prediction and target gives ``dice_c`` = 1, never NaN.

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
    intersection = (p * t).sum(dims)
    denominator = p.sum(dims) + t.sum(dims)
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
    _check_channels(logits.shape[1], head, "logits")
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


def _channel_dim(tensor: torch.Tensor) -> int:
    if tensor.ndim == 5:
        return 1
    if tensor.ndim == 4:
        return 0
    raise ValueError(f"expected (B, C, W, H, D) or (C, W, H, D), got shape {tuple(tensor.shape)}")


def _check_head(head: str) -> None:
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")


def _check_channels(channels: int, head: str, what: str) -> None:
    expected = out_channels(head)
    if channels != expected:
        raise ValueError(
            f"the {head!r} head has {expected} channels, but {what} have {channels}; "
            "was the model built for another loss?"
        )

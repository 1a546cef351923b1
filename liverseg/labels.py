"""Output heads and THE one place where network outputs become label maps; label-value checks.

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

Training, validation, inference and notebooks go through :func:`to_probabilities` and
:func:`to_labels` rather than thresholding or taking an argmax themselves, and every reader of a
label map checks its values with :func:`invalid_label_values`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from liverseg.constants import BACKGROUND, HEADS, LABEL_VALUES, LIVER, LOSSES, TUMOR

if TYPE_CHECKING:  # torch is not imported here: the data doctor checks labels without it
    import torch

# Region channels of the "regions" head: each is the set of label values it contains.
REGIONS = ((LIVER, TUMOR), (TUMOR,))
# Class of each channel of the "softmax" head.
SOFTMAX_CLASSES = (BACKGROUND, LIVER, TUMOR)
# The head each loss (constants.LOSSES) trains.
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
        return logits.sigmoid()
    return logits.softmax(dim=_channel_dim(logits))


def background_probabilities(head: str) -> tuple[float, ...]:
    """The probabilities, one per channel, of a voxel that is certainly background.

    ``(0, 0)`` for ``"regions"`` (in neither region), ``(1, 0, 0)`` for ``"softmax"``; what
    inference gives voxels that no model saw (air it did not run the model on).

    Raises:
        ValueError: For an unknown head.
    """
    _check_head(head)
    if head == "regions":
        return (0.0,) * len(REGIONS)
    return tuple(float(c == BACKGROUND) for c in SOFTMAX_CLASSES)


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
    check_channels(probabilities.shape[dim], head, "probabilities")
    if head == "softmax":
        classes = probabilities.new_tensor(SOFTMAX_CLASSES).byte()
        return classes[probabilities.argmax(dim=dim)]
    p_liver, p_tumor = probabilities.unbind(dim=dim)
    liver = p_liver > threshold
    tumor = liver & (p_tumor > threshold)
    labels = probabilities.new_full(liver.shape, BACKGROUND).byte()
    labels[liver] = LIVER
    labels[tumor] = TUMOR
    return labels


def region_probabilities(probabilities: torch.Tensor, head: str) -> torch.Tensor:
    """The probabilities of the two nested regions, whatever the head: liver incl. tumor, tumor.

    ``"regions"``: the two channels as they are; ``"softmax"``: ``(p_liver + p_tumor, p_tumor)``.
    What per-case quality control and lesion confidences read (:mod:`liverseg.evaluation.qc`).

    Args:
        probabilities: ``(C, ...)`` from :func:`to_probabilities` (channels first).
        head: ``"regions"`` or ``"softmax"``.

    Returns:
        ``(2, ...)`` probabilities of the liver region (label in {LIVER, TUMOR}) and the tumor
        region (label == TUMOR).
    """
    check_channels(probabilities.shape[0], head, "probabilities")
    if head == "regions":
        return probabilities
    regions = probabilities[1:].clone()  # (p_liver, p_tumor) -> (p_liver + p_tumor, p_tumor)
    regions[0] += probabilities[2]
    return regions


def invalid_label_values(labels: np.ndarray, limit: int = 10) -> list:
    """The values of a label map that are not label values (empty when all are valid).

    Valid values are :data:`liverseg.constants.LABEL_VALUES` (background, liver, tumor); a float
    map must hold them exactly (NaN, 0.5 or 1.0000001 are invalid).

    Args:
        labels: Label map, any shape, integer or float dtype.
        limit: Report at most this many distinct invalid values (the smallest).

    Returns:
        Up to ``limit`` distinct invalid values, sorted, as Python numbers.
    """
    labels = np.asarray(labels)
    # One boolean array per value: np.isin's table method allocates an intp index per voxel.
    outside = labels != LABEL_VALUES[0]
    for value in LABEL_VALUES[1:]:
        outside &= labels != value
    if not outside.any():
        return []
    return np.unique(labels[outside])[:limit].tolist()


def _channel_dim(tensor: torch.Tensor) -> int:
    if tensor.ndim == 5:
        return 1
    if tensor.ndim == 4:
        return 0
    raise ValueError(f"expected (B, C, W, H, D) or (C, W, H, D), got shape {tuple(tensor.shape)}")


def _check_head(head: str) -> None:
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")


def check_channels(channels: int, head: str, what: str) -> None:
    """Raise ValueError unless ``channels`` is the channel count of ``head``."""
    expected = out_channels(head)
    if channels != expected:
        raise ValueError(
            f"the {head!r} head has {expected} channels, but {what} have {channels}; "
            "was the model built for another loss?"
        )

"""Preprocessing shared by training and inference, so both see the same intensities."""

from __future__ import annotations

import torchio as tio


def intensity_transform(hu_min: float, hu_max: float) -> tio.Transform:
    """Clip CT to a fixed HU window and map it linearly to (-1, 1).

    A fixed window (not each volume's min/max) keeps a given tissue at the same value in
    every case, in training and at inference.

    Args:
        hu_min: HU mapped to -1; lower values are clipped.
        hu_max: HU mapped to +1; higher values are clipped.

    Returns:
        A torchio transform acting on scalar images only.
    """
    if not hu_max > hu_min:
        raise ValueError(f"hu_max ({hu_max}) must be greater than hu_min ({hu_min})")
    return tio.Compose(
        [
            tio.Clamp(out_min=hu_min, out_max=hu_max),
            tio.RescaleIntensity(out_min_max=(-1.0, 1.0), in_min_max=(hu_min, hu_max)),
        ]
    )


def preprocessing_settings(hu_min: float, hu_max: float, factor: int, head: str) -> dict:
    """The plain dict a checkpoint carries so inference can rebuild preprocessing alone.

    Args:
        hu_min: Lower end of the HU window.
        hu_max: Upper end of the HU window.
        factor: Reduction of the training data relative to the original scans (1: none).
        head: Output decoding, ``"regions"`` or ``"softmax"`` (see liverseg.training.losses).
    """
    return {"hu_min": float(hu_min), "hu_max": float(hu_max), "factor": int(factor), "head": head}

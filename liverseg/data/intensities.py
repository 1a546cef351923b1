"""Whether a volume's voxel values can be a CT in Hounsfield units: what is refused, what is warned.

One rule for the data doctor (:func:`liverseg.data.checks.check_case`) and for prediction
(:func:`liverseg.inference.volume.predict_volume`, ``liverseg predict``), so a volume that
``liverseg check`` refuses is never segmented without a word.

Errors (nothing sensible can be learned from or segmented in it):

- NaN or +-Inf voxels. The HU window keeps NaN, and one NaN in a patch makes the network's
  normalisation NaN for the whole patch: a single bad voxel empties the segmentation.
- 8-bit signed integers without scaling (``int8``, values in -128..127). CT in HU spans about
  -1024 (air) to 3071 (bone); 8 bits cannot hold it, so the writer wrapped or clipped the HU and
  no rule brings the tissue contrast back.

Warnings (the volume is used, its numbers are suspect):

- one value everywhere (a blank, e.g. all-zero, volume: a failed export);
- no voxel below 0 HU or none above 10 HU: not HU (normalised to [0, 1], offset by +1024, MR
  intensities such as 0..4000); the HU window clips such values to one tissue.

numpy only; no torch.
"""

from __future__ import annotations

import numpy as np

from liverseg.errors import DataError


def ct_value_problems(
    values: np.ndarray, slope: float = 1.0, inter: float = 0.0
) -> tuple[list[str], list[str]]:
    """The errors and warnings of a volume's voxel values as CT in HU.

    Args:
        values: Voxels, any shape and numeric dtype, as stored (HU = values * slope + inter);
            not modified and never copied whole (the finite range is taken in place).
        slope: The header's ``scl_slope`` (1 for data already in HU).
        inter: The header's ``scl_inter`` (0 for data already in HU).

    Returns:
        ``(errors, warnings)``: messages that say what was found, what was expected and how to
        fix it, without the file's name (the caller adds it).
    """
    values = np.asarray(values)
    errors: list[str] = []
    finite_mask = None
    if values.dtype.kind == "f":
        finite_mask = np.isfinite(values)
        bad = int(finite_mask.size - np.count_nonzero(finite_mask))
        if bad:
            errors.append(
                f"{bad:,} NaN/Inf voxels: expected finite HU everywhere; replace them (e.g. with "
                "-1024, air) or re-export the scan"
            )
        else:
            finite_mask = None
    if values.dtype == np.int8 and slope == 1 and inter == 0:
        # Their range says nothing more: no warning beside this error.
        errors.append(
            "voxels are stored as 8-bit integers (int8, -128..127): CT in HU spans about -1024 "
            "(air) to 3071 (bone), which 8 bits cannot hold, so the HU were wrapped or clipped "
            "when the file was written; re-export the scan as int16 (or with scl_slope/scl_inter)"
        )
        return errors, []
    low, high = _scaled_range(values, finite_mask, slope, inter)
    warnings: list[str] = []
    if np.isnan(low):
        return errors, warnings
    if low == high:
        warnings.append(
            f"every voxel is {low:g}: a blank volume (expected CT in HU, air near -1000, liver "
            "~100), nothing to segment; was the export or conversion cut short? Re-export the scan"
        )
    elif high <= 10 or low >= 0:
        warnings.append(
            f"intensities span [{low:g}, {high:g}]: expected CT in HU (air near -1000, liver "
            "~100); this looks normalised, offset or not a CT (MR). Convert it to HU "
            "(scl_slope/scl_inter): as it is, the HU window clips it and segmentations and "
            "volumes of this case are unreliable"
        )
    return errors, warnings


def check_ct_values(hu: np.ndarray, name: str) -> list[str]:
    """Refuse a volume that cannot be segmented; return the warnings of one that can.

    Args:
        hu: CT in HU (scaling already applied), any shape and numeric dtype.
        name: The file or object, for the message.

    Returns:
        The warnings of :func:`ct_value_problems` (not logged here).

    Raises:
        DataError: NaN/Inf voxels or int8 HU; names ``name``.
    """
    errors, warnings = ct_value_problems(hu)
    if errors:
        raise DataError(f"{name}: cannot segment this volume: {'; '.join(errors)}")
    return warnings


def _scaled_range(
    values: np.ndarray, finite_mask: np.ndarray | None, slope: float, inter: float
) -> tuple[float, float]:
    """(min, max) of the finite ``values`` after scaling; NaN when none is finite or empty."""
    if values.size == 0 or (finite_mask is not None and not finite_mask.any()):
        return float("nan"), float("nan")
    if finite_mask is None:
        ends = np.array([values.min(), values.max()], float)
    else:
        ends = np.array(
            [
                values.min(where=finite_mask, initial=np.inf),
                values.max(where=finite_mask, initial=-np.inf),
            ],
            float,
        )
    ends = ends * slope + inter
    return float(ends.min()), float(ends.max())
